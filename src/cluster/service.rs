//! The internal service on `--cluster`: openraft RPCs into this node's groups (entries
//! arrive on pipelined append streams, see [`super::network`]), the other nodes' beats
//! ([`super::liveness`]) and ops that other nodes forward here. Every call must carry a
//! valid proof of the cluster secret (see [`super::auth`]), and every message of a stream
//! its own; nothing else is looked at before the proof checks out.
//!
//! The service serves from the moment the listener is bound, before this node's groups are
//! open ([`Local`]): a starting node that holds no data answers its peers' start-up question
//! ([`super::rejoin`]) while it asks them the same; everything else waits until it runs
//! (a Raft call finds no group, a beat or a forwarded op is "unavailable").

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use openraft::raft::AppendEntriesRequest;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{MAC_KEY, Secret, TS_KEY, now_ms};
use super::catch_up::TermRequest;
use super::network::{
    GROUP_KEY, KIND_APPEND, KIND_APPEND_STREAM, KIND_BEAT, KIND_GROUP_TERM, KIND_KNOWN,
    KIND_SNAPSHOT_CHUNK, KIND_SNAPSHOT_HELD, KIND_VOTE, NODE_KEY, STREAM_KEY, StreamReply,
    raft_method, scope,
};
use super::rejoin::{Local, Question};
use super::snapshot_transfer::{ChunkRequest, HeldRequest};
use super::types::{Forwarded, TypeConfig, Vote, decode, encode};
use crate::proto::cluster::cluster_server::{self, ClusterServer};
use crate::proto::cluster::{ForwardRequest, RaftRequest, Reply, StreamRequest};

/// The service.
pub struct Service {
    local: Arc<Local>,
}

fn starting() -> Status {
    Status::unavailable("this node is starting")
}

impl Service {
    /// The tonic server of the service.
    pub fn server(local: Arc<Local>) -> ClusterServer<Service> {
        ClusterServer::new(Service { local })
            .max_decoding_message_size(super::network::MAX_MESSAGE)
            .max_encoding_message_size(super::network::MAX_MESSAGE)
    }

    /// Checks the proof of a call; the calling node's id when it holds.
    fn verify<T>(
        &self,
        request: &Request<T>,
        method: &str,
        group: u64,
        body: &[u8],
    ) -> Result<u64, Status> {
        let meta = request.metadata();
        let get = |key: &str| meta.get(key).and_then(|v| v.to_str().ok());
        let denied = || Status::unauthenticated("cluster call without a valid proof of the secret");
        let ts: i64 = get(TS_KEY)
            .and_then(|v| v.parse().ok())
            .ok_or_else(denied)?;
        let from: u64 = get(NODE_KEY)
            .and_then(|v| v.parse().ok())
            .ok_or_else(denied)?;
        let proof = get(MAC_KEY).ok_or_else(denied)?;
        if !self.local.peers().secret().verify(
            now_ms(),
            ts,
            &scope(method, group, from),
            body,
            proof,
        ) {
            tracing::warn!(
                from,
                method,
                "refused a cluster call: bad proof of the secret"
            );
            return Err(denied());
        }
        self.local.peers().saw(from);
        Ok(from)
    }
}

/// The replies of an append stream.
type Replies = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

/// The requests of an append stream, each checked against its proof and decoded; the first
/// message that fails (a bad proof, out of sequence, undecodable, or a broken stream) ends
/// them and is kept in `refused`, to end the replies with once openraft answered the rest.
fn checked_requests(
    messages: impl Stream<Item = Result<StreamRequest, Status>> + Send + 'static,
    (secret, stream_id): (Secret, String),
    admit: impl Fn(&AppendEntriesRequest<TypeConfig>) -> Result<(), Status> + Send + 'static,
    refused: Arc<parking_lot::Mutex<Option<Status>>>,
) -> impl Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static {
    messages
        .enumerate()
        .scan((), move |(), (expected, message)| {
            let request = match message {
                Ok(message) => {
                    let signed = message.seq == expected as u64
                        && secret.verify_in_stream(
                            stream_id.as_bytes(),
                            message.seq,
                            &message.body,
                            &message.proof,
                        );
                    if signed {
                        decode(&message.body).map_err(bad)
                    } else {
                        Err(Status::unauthenticated(
                            "append stream message without a valid proof of the secret",
                        ))
                    }
                }
                Err(status) => Err(status),
            };
            let request = request.and_then(|request: AppendEntriesRequest<TypeConfig>| {
                admit(&request).map(|()| request)
            });
            let request = match request {
                Ok(request) => Some(request),
                Err(status) => {
                    *refused.lock() = Some(status);
                    None
                }
            };
            std::future::ready(request)
        })
}

/// Lets entries or a snapshot from the leader of `vote` into `group` here, or refuses
/// them: a group that lost its log takes them only from its term floor on (see
/// `catch_up.rs`).
fn admit(cluster: &super::Cluster, group: u64, vote: &Vote) -> Result<(), Status> {
    if cluster.groups().admits_leader(group, vote.leader_id.term) {
        return Ok(());
    }
    Err(Status::unavailable(format!(
        "raft group {group} here lost its log: it takes entries only from a leader of a term \
         every other replica has reached (not known yet, or this leader's is older)"
    )))
}

/// The start of the message of a call this node could not decode (from a peer of another
/// release, say).
pub const UNDECODABLE: &str = "undecodable cluster call";

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{UNDECODABLE}: {e}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<Reply>, Status> {
    let body = encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(Reply { body: body.into() }))
}

#[tonic::async_trait]
impl cluster_server::Cluster for Service {
    type AppendStreamStream = Replies;

    /// A leader's append stream into one of this node's groups: openraft takes the
    /// requests as they arrive (`Raft::stream_append`) and answers them in order.
    async fn append_stream(
        &self,
        request: Request<Streaming<StreamRequest>>,
    ) -> Result<Response<Replies>, Status> {
        let meta = request.metadata();
        let get = |key: &str| meta.get(key).and_then(|v| v.to_str().ok());
        let denied =
            || Status::unauthenticated("append stream without a valid proof of the secret");
        let group: u64 = get(GROUP_KEY)
            .and_then(|v| v.parse().ok())
            .ok_or_else(denied)?;
        let stream_id = get(STREAM_KEY).ok_or_else(denied)?.to_string();
        self.verify(
            &request,
            &raft_method(KIND_APPEND_STREAM),
            group,
            stream_id.as_bytes(),
        )?;
        let cluster = self.local.cluster().ok_or_else(starting)?;
        let raft = cluster
            .groups()
            .raft(group)
            .ok_or_else(|| Status::not_found(format!("no raft group {group} here (yet)")))?;
        let refused = Arc::new(parking_lot::Mutex::new(None));
        let admits =
            move |request: &AppendEntriesRequest<TypeConfig>| admit(&cluster, group, &request.vote);
        let requests = checked_requests(
            request.into_inner(),
            (self.local.peers().secret().clone(), stream_id),
            admits,
            Arc::clone(&refused),
        );
        let answers = raft.stream_append(requests).map(|answer| {
            let answer: StreamReply = answer.map_err(|fatal| fatal.to_string());
            let body = encode(&answer).map_err(|e| Status::internal(e.to_string()))?;
            Ok(Reply { body: body.into() })
        });
        let refusal = futures_util::stream::once(async move { refused.lock().take() })
            .filter_map(|refused| std::future::ready(refused.map(Err)));
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    async fn raft(&self, request: Request<RaftRequest>) -> Result<Response<Reply>, Status> {
        let group = request.get_ref().group;
        let kind = request.get_ref().kind;
        let body = request.get_ref().body.clone();
        let from = self.verify(&request, &raft_method(kind), group, &body)?;
        if kind == KIND_KNOWN {
            let question: Question = decode(&body).map_err(bad)?;
            return reply(&self.local.acquaintance(question).await);
        }
        let Some(cluster) = self.local.cluster() else {
            return Err(match kind {
                KIND_BEAT => starting(),
                _ => Status::not_found(format!("no raft group {group} here (yet)")),
            });
        };
        if kind == KIND_BEAT {
            cluster.beat_received(from, &body).await.map_err(bad)?;
            return reply(&());
        }
        if kind == KIND_GROUP_TERM {
            let request: TermRequest = decode(&body).map_err(bad)?;
            if request.replicate
                && let Some(raft) = cluster.groups().raft(group)
                && cluster.leads(&raft)
                && let Err(error) = raft.trigger().heartbeat().await
            {
                tracing::debug!(group, %error, "cannot send a heartbeat to a replica that catches up");
            }
            return reply(&cluster.groups().group_term(group));
        }
        let Some(raft) = cluster.groups().raft(group) else {
            return Err(Status::not_found(format!(
                "no raft group {group} here (yet)"
            )));
        };
        if matches!(kind, KIND_VOTE | super::handoff::KIND_ELECT)
            && cluster.groups().has_lost(group)
        {
            // Its log was lost here: a vote from it could undo committed entries.
            return Err(Status::unavailable(format!(
                "raft group {group} here is catching up after losing its log: it does not vote yet"
            )));
        }
        match kind {
            KIND_VOTE => reply(&raft.vote(decode(&body).map_err(bad)?).await),
            KIND_APPEND => {
                let request: AppendEntriesRequest<TypeConfig> = decode(&body).map_err(bad)?;
                admit(&cluster, group, &request.vote)?;
                reply(&raft.append_entries(request).await)
            }
            // The resumable snapshot transfer (see `snapshot_transfer.rs`).
            KIND_SNAPSHOT_HELD => {
                let request: HeldRequest = decode(&body).map_err(bad)?;
                admit(&cluster, group, &request.vote)?;
                let receiver = cluster.groups().snapshot_receiver();
                reply(&receiver.held(&raft, group, request).await)
            }
            KIND_SNAPSHOT_CHUNK => {
                let request: ChunkRequest = decode(&body).map_err(bad)?;
                admit(&cluster, group, &request.vote)?;
                let receiver = cluster.groups().snapshot_receiver();
                reply(&receiver.chunk(&raft, group, request).await)
            }
            // Leader hand-off (see `handoff.rs`).
            super::handoff::KIND_ELECT => reply(&cluster.campaign(&raft).await),
            other => Err(bad(format!("unknown raft call kind {other}"))),
        }
    }

    async fn forward(&self, request: Request<ForwardRequest>) -> Result<Response<Reply>, Status> {
        let hops = request.get_ref().hops;
        let body = request.get_ref().body.clone();
        self.verify(&request, "forward", u64::from(hops), &body)?;
        let cluster = self.local.cluster().ok_or_else(starting)?;
        let forwarded: Forwarded = decode(&body).map_err(bad)?;
        reply(
            &cluster
                .execute_routed(forwarded.command, hops, forwarded.group)
                .await,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::types::Vote;

    fn request(term: u64) -> Vec<u8> {
        let request: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        };
        encode(&request).unwrap()
    }

    fn message(secret: &Secret, stream: &str, seq: u64, body: Vec<u8>) -> StreamRequest {
        StreamRequest {
            seq,
            proof: secret.sign_in_stream(stream.as_bytes(), seq, &body),
            body: body.into(),
        }
    }

    /// Runs `messages` through the checks of stream `s1`: the terms of the requests
    /// taken, and the refusal that ended them.
    async fn check(messages: Vec<StreamRequest>) -> (Vec<u64>, Option<tonic::Code>) {
        check_from(messages, 0).await
    }

    /// [`check`] in a group that takes entries from leaders of term `floor` on.
    async fn check_from(
        messages: Vec<StreamRequest>,
        floor: u64,
    ) -> (Vec<u64>, Option<tonic::Code>) {
        let secret = Secret::new("a-cluster-secret-of-some-length");
        let refused = Arc::new(parking_lot::Mutex::new(None));
        let taken: Vec<u64> = checked_requests(
            futures_util::stream::iter(messages.into_iter().map(Ok)),
            (secret, "s1".into()),
            move |r: &AppendEntriesRequest<TypeConfig>| {
                if r.vote.leader_id.term >= floor {
                    Ok(())
                } else {
                    Err(Status::unavailable("below the floor"))
                }
            },
            Arc::clone(&refused),
        )
        .map(|r| r.vote.leader_id.term)
        .collect()
        .await;
        let code = refused.lock().as_ref().map(Status::code);
        (taken, code)
    }

    /// Messages signed for the stream, in order, all go through; one signed for another
    /// stream, out of place or with another body ends the stream there, refused.
    #[tokio::test]
    async fn only_the_streams_own_messages_in_order_go_through() {
        let secret = Secret::new("a-cluster-secret-of-some-length");
        let good = |seq, term| message(&secret, "s1", seq, request(term));
        assert_eq!(
            check(vec![good(0, 1), good(1, 2)]).await,
            (vec![1, 2], None)
        );
        let unauthenticated = Some(tonic::Code::Unauthenticated);
        let other_stream = message(&secret, "s2", 1, request(2));
        assert_eq!(
            check(vec![good(0, 1), other_stream, good(2, 3)]).await,
            (vec![1], unauthenticated)
        );
        assert_eq!(check(vec![good(1, 1)]).await, (vec![], unauthenticated));
        assert_eq!(
            check(vec![good(0, 1), good(0, 1)]).await,
            (vec![1], unauthenticated)
        );
        let mut forged = good(0, 1);
        forged.body = request(9).into();
        assert_eq!(check(vec![forged]).await, (vec![], unauthenticated));
        let wrong_secret = message(
            &Secret::new("another-secret-of-some-length"),
            "s1",
            0,
            request(1),
        );
        assert_eq!(check(vec![wrong_secret]).await, (vec![], unauthenticated));
    }

    /// A replica that lost the group's log takes no request of a leader below its term
    /// floor: the stream ends there, unavailable (the leader tries again later).
    #[tokio::test]
    async fn a_leader_below_the_floor_is_refused() {
        let secret = Secret::new("a-cluster-secret-of-some-length");
        let good = |seq, term| message(&secret, "s1", seq, request(term));
        assert_eq!(
            check_from(vec![good(0, 3), good(1, 4)], 3).await,
            (vec![3, 4], None)
        );
        assert_eq!(
            check_from(vec![good(0, 2), good(1, 3)], 3).await,
            (vec![], Some(tonic::Code::Unavailable))
        );
    }
}
