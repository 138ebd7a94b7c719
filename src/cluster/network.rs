//! Talking to the other nodes: one lazily connected HTTP/2 channel per peer, shared by
//! every Raft group, by the node's beats ([`super::liveness`]) and by forwarded ops, each
//! call signed with the cluster secret; and openraft's [`RaftNetworkFactory`] over it, one
//! per group. A call to a node that is gone fails fast: connecting gives up after
//! [`CONNECT_TIMEOUT`], and every call has a deadline.
//!
//! Entries go to a follower over one stream per replication session ([`append_stream`]):
//! the leader sends each AppendEntries as soon as openraft has it, without waiting for the
//! answer to the one before, and the follower answers them in order (openraft's
//! `stream_append` on both ends). A request left unanswered for longer than openraft's RPC
//! deadline ends the stream.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::ClusterError;
use super::auth::{MAC_KEY, Secret, TS_KEY, now_ms};
use super::snapshot::{Snapshot, SnapshotData};
use super::snapshot_transfer::{self, ChunkRequest, HeldRequest, Link, Pace, TransferReply};
use super::types::{TypeConfig, Vote, decode, encode};
use crate::proto::cluster::cluster_client::ClusterClient;
use crate::proto::cluster::{ForwardRequest, RaftRequest, StreamRequest};

/// Kind of a Raft RPC: vote.
pub const KIND_VOTE: u32 = 1;
/// Kind of a Raft RPC: append entries.
pub const KIND_APPEND: u32 = 2;
/// Kind of a Raft RPC: install snapshot in openraft 0.9's chunks (no longer sent or
/// answered; the number stays taken).
pub const KIND_SNAPSHOT: u32 = 3;
/// Kind of a call on the Raft method that is no Raft RPC: a node's beat (group 0).
pub const KIND_BEAT: u32 = 4;
/// Kind of a call on the Raft method that is no Raft RPC: campaign in the group at once
/// (leader hand-off, see `handoff.rs`). Every kind is listed here, so that no two share
/// a number.
pub const KIND_ELECT: u32 = 5;
/// Kind of a call on the Raft method that is no Raft RPC: a starting node without data asks
/// whether the callee knows it as a member that ran (group 0; a `rejoin::Question`,
/// answered with a `rejoin::Acquaintance`, also before the callee's groups are open).
pub const KIND_KNOWN: u32 = 6;
/// Kind of a call on the Raft method: how much of a snapshot does the callee hold (the
/// resumable snapshot transfer, see `snapshot_transfer.rs`)?
pub const KIND_SNAPSHOT_HELD: u32 = 7;
/// Kind of a call on the Raft method: one chunk of a snapshot (see `snapshot_transfer.rs`).
pub const KIND_SNAPSHOT_CHUNK: u32 = 8;
/// The kind an append stream's opening is signed under (it is no call on the Raft method).
pub const KIND_APPEND_STREAM: u32 = 9;
/// Kind of a call on the Raft method that is no Raft RPC: a replica that lost a group's log
/// asks another replica for the group's term and voters (a `catch_up::GroupTerm`, or none
/// where the group is not open or was lost there too; see `catch_up.rs`).
pub const KIND_GROUP_TERM: u32 = 10;
/// Metadata key of an append stream's group.
pub const GROUP_KEY: &str = "x-qit-group";
/// Metadata key of an append stream's id (hex), which its messages' proofs cover.
pub const STREAM_KEY: &str = "x-qit-stream";
/// How long connecting to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Metadata key naming the calling node.
pub const NODE_KEY: &str = "x-qit-node";
/// Largest message on the internal service.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// A peer heard from within this many ms counts as up.
pub const UP_WITHIN_MS: i64 = 3_000;

/// The scope a call's proof covers: method, group and calling node.
pub fn scope(method: &str, group: u64, from: u64) -> Vec<u8> {
    format!("{method}/{group}/{from}").into_bytes()
}

/// The method name a Raft call of `kind` is signed under (the kind is part of the proof,
/// so a signed body cannot be replayed as another kind of call).
pub fn raft_method(kind: u32) -> String {
    format!("raft.{kind}")
}

struct Peer {
    addr: String,
    client: ClusterClient<Channel>,
    /// When this node last heard from the peer (ms), 0 never.
    seen: AtomicI64,
}

/// A lazily connected channel to `addr`, from `local` when given.
fn connect(id: u64, addr: &str, local: Option<std::net::IpAddr>) -> Result<Peer, ClusterError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClusterError::Config(format!("peer {id} address `{addr}`: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .local_address(local)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let client = ClusterClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Ok(Peer {
        addr: addr.to_string(),
        client,
        seen: AtomicI64::new(0),
    })
}

/// The other nodes of the cluster: the initial `--peers`, and every node the metadata
/// group's membership names since (see [`super::membership`]).
pub struct Peers {
    node_id: u64,
    secret: Secret,
    local: Option<std::net::IpAddr>,
    peers: RwLock<BTreeMap<u64, Arc<Peer>>>,
}

impl Peers {
    /// Channels to every peer but `node_id` (connected on first use). With `local`, every
    /// connection to a peer goes out from that address (this node's `--cluster` IP, when it
    /// names one): the peers then see the node at the address it announces, and a firewall
    /// rule on that address cuts the node off as a whole (the partition test does so).
    pub fn new(
        node_id: u64,
        addrs: &BTreeMap<u64, String>,
        secret: Secret,
        local: Option<std::net::IpAddr>,
    ) -> Result<Self, ClusterError> {
        let mut peers = BTreeMap::new();
        for (id, addr) in addrs {
            if *id != node_id {
                peers.insert(*id, Arc::new(connect(*id, addr, local)?));
            }
        }
        Ok(Self {
            node_id,
            secret,
            local,
            peers: RwLock::new(peers),
        })
    }

    /// Makes `id` a peer at `addr` (a node that joined, or moved to another address); a
    /// known peer at the same address keeps its channel.
    pub fn ensure(&self, id: u64, addr: &str) {
        if id == self.node_id || self.peers.read().get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        match connect(id, addr, self.local) {
            Ok(peer) => {
                tracing::info!(node = id, addr, "new peer");
                self.peers.write().insert(id, Arc::new(peer));
            }
            Err(error) => tracing::warn!(node = id, addr, %error, "unusable peer address"),
        }
    }

    /// Every peer's id.
    pub fn ids(&self) -> Vec<u64> {
        self.peers.read().keys().copied().collect()
    }

    /// The secret calls are checked against.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Notes that `node` was heard from.
    pub fn saw(&self, node: u64) {
        if let Some(peer) = self.peers.read().get(&node) {
            peer.seen.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// True for this node, and for a peer heard from within [`UP_WITHIN_MS`].
    pub fn is_up(&self, node: u64) -> bool {
        node == self.node_id
            || self
                .peers
                .read()
                .get(&node)
                .is_some_and(|p| now_ms() - p.seen.load(Ordering::Relaxed) <= UP_WITHIN_MS)
    }

    /// A peer's cluster address.
    pub fn addr(&self, node: u64) -> Option<String> {
        self.peers.read().get(&node).map(|p| p.addr.clone())
    }

    /// A call whose message `message` makes from `body`, signed over `body` (moved into
    /// the message, not copied).
    fn signed<T>(
        &self,
        method: &str,
        group: u64,
        body: Vec<u8>,
        message: impl FnOnce(bytes::Bytes) -> T,
    ) -> tonic::Request<T> {
        let proof = self.proof(method, group, &body);
        let mut request = tonic::Request::new(message(body.into()));
        proof.attach(&mut request);
        request
    }

    /// This node's proof of a call: `method` on `group` with `body`, signed now.
    fn proof(&self, method: &str, group: u64, body: &[u8]) -> Proof {
        let ts = now_ms();
        Proof {
            ts,
            node: self.node_id,
            mac: self
                .secret
                .sign(ts, &scope(method, group, self.node_id), body),
        }
    }

    fn peer(&self, target: u64) -> Result<Arc<Peer>, tonic::Status> {
        self.peers
            .read()
            .get(&target)
            .cloned()
            .ok_or_else(|| tonic::Status::not_found(format!("node {target} is not a peer")))
    }

    /// Opens an append stream to `target`'s group `group`: every request `requests` yields
    /// goes out at once, signed; the replies come back in order. Gives up opening after
    /// `timeout`.
    pub async fn append_stream(
        &self,
        target: u64,
        group: u64,
        requests: impl Stream<Item = Vec<u8>> + Send + 'static,
        timeout: Duration,
    ) -> Result<tonic::Streaming<crate::proto::cluster::Reply>, tonic::Status> {
        let peer = self.peer(target)?;
        let stream_id = format!("{:032x}", rand::random::<u128>());
        let proof = self.proof(
            &raft_method(KIND_APPEND_STREAM),
            group,
            stream_id.as_bytes(),
        );
        let secret = self.secret.clone();
        let id = stream_id.clone();
        let messages = requests.enumerate().map(move |(seq, body)| {
            let seq = seq as u64;
            StreamRequest {
                seq,
                proof: secret.sign_in_stream(id.as_bytes(), seq, &body),
                body: body.into(),
            }
        });
        let mut request = tonic::Request::new(messages);
        proof.attach(&mut request);
        let meta = request.metadata_mut();
        if let (Ok(group), Ok(id)) = (group.to_string().parse(), stream_id.parse()) {
            meta.insert(GROUP_KEY, group);
            meta.insert(STREAM_KEY, id);
        }
        let opened = tokio::time::timeout(timeout, peer.client.clone().append_stream(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("opening an append stream"))??;
        self.saw(target);
        Ok(opened.into_inner())
    }
}

/// A call's proof of the cluster secret, as it goes in the call's metadata.
struct Proof {
    ts: i64,
    node: u64,
    mac: String,
}

impl Proof {
    fn attach<T>(&self, request: &mut tonic::Request<T>) {
        let meta = request.metadata_mut();
        if let (Ok(ts), Ok(proof), Ok(node)) = (
            self.ts.to_string().parse(),
            self.mac.parse(),
            self.node.to_string().parse(),
        ) {
            meta.insert(TS_KEY, ts);
            meta.insert(MAC_KEY, proof);
            meta.insert(NODE_KEY, node);
        }
    }
}

impl Peers {
    /// Sends one Raft RPC body to `target`'s group `group`.
    pub async fn raft(
        &self,
        target: u64,
        group: u64,
        kind: u32,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<bytes::Bytes, tonic::Status> {
        let peer = self.peer(target)?;
        let mut request = self.signed(&raft_method(kind), group, body, |body| RaftRequest {
            group,
            kind,
            body,
        });
        request.set_timeout(timeout);
        let reply = peer.client.clone().raft(request).await?;
        self.saw(target);
        Ok(reply.into_inner().body)
    }

    /// Sends this node's beat to `target`.
    pub async fn beat(
        &self,
        target: u64,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        self.raft(target, 0, KIND_BEAT, body, timeout)
            .await
            .map(|_| ())
    }

    /// Forwards an encoded command to `target`, giving up after `timeout`.
    pub async fn forward(
        &self,
        target: u64,
        hops: u32,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<bytes::Bytes, tonic::Status> {
        let peer = self.peer(target)?;
        let mut request = self.signed("forward", u64::from(hops), body, |body| ForwardRequest {
            hops,
            body,
        });
        request.set_timeout(timeout);
        let reply = peer.client.clone().forward(request).await?;
        self.saw(target);
        Ok(reply.into_inner().body)
    }
}

/// openraft's network for one group.
#[derive(Clone)]
pub struct Network {
    /// The group.
    pub group: u64,
    /// The peers.
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        // A node added to a group (a learner joining) may be new to this node.
        self.peers.ensure(target, &node.addr);
        Connection {
            group: self.group,
            target,
            peers: Arc::clone(&self.peers),
        }
    }
}

/// openraft's connection to one peer for one group.
pub struct Connection {
    group: u64,
    target: u64,
    peers: Arc<Peers>,
}

/// What a follower answers to one request of an append stream: openraft's result, or why
/// its group could not take it (the group stopped).
pub type StreamReply = Result<StreamAppendResult<TypeConfig>, String>;

/// An RPC error for a call that got no answer.
fn unreachable(e: impl std::error::Error + 'static) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&e))
}

/// An RPC error for an answer that makes no sense or came too late.
fn network_error(e: impl std::error::Error + 'static) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

impl Connection {
    async fn call<Req, Resp>(
        &self,
        kind: u32,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = encode(request).map_err(network_error)?;
        let reply = self
            .peers
            .raft(self.target, self.group, kind, body, option.hard_ttl())
            .await
            .map_err(unreachable)?;
        let result: Result<Resp, RaftError<TypeConfig>> = decode(&reply).map_err(network_error)?;
        // The callee's group stopped (its only error here): as good as unreachable.
        result.map_err(unreachable)
    }

    /// One call of the snapshot transfer; `Err` when it got no usable answer.
    async fn transfer<Req: Serialize>(
        &self,
        kind: u32,
        request: &Req,
        ttl: Duration,
    ) -> Result<TransferReply, String> {
        let body = encode(request).map_err(|e| e.to_string())?;
        let reply = self
            .peers
            .raft(self.target, self.group, kind, body, ttl)
            .await
            .map_err(|status| status.to_string())?;
        decode(&reply).map_err(|e| e.to_string())
    }

    /// Opens the append stream of one replication session (see the module docs).
    async fn open_append_stream<S>(
        &self,
        input: S,
        option: RPCOption,
    ) -> Result<AppendReplies, RPCError<TypeConfig>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static,
    {
        let deadline = option.hard_ttl();
        let sent = Arc::new(parking_lot::Mutex::new(VecDeque::new()));
        let sending = Arc::clone(&sent);
        let target = self.target;
        // A request that cannot be encoded (larger than the codec takes) ends the stream:
        // openraft starts the next session from the last answered request.
        let bodies = input.scan((), move |(), request| {
            let body = match encode(&request) {
                Ok(body) => {
                    sending.lock().push_back(Instant::now());
                    Some(body)
                }
                Err(error) => {
                    tracing::warn!(target, %error, "an append request could not be encoded");
                    None
                }
            };
            std::future::ready(body)
        });
        let replies = self
            .peers
            .append_stream(self.target, self.group, bodies, option.soft_ttl())
            .await
            .map_err(unreachable)?;
        Ok(AppendReplies {
            replies,
            sent,
            deadline,
        })
    }
}

/// The answers of an append stream, in the order of the requests, and when each request
/// still unanswered went out.
struct AppendReplies {
    replies: tonic::Streaming<crate::proto::cluster::Reply>,
    sent: Arc<parking_lot::Mutex<VecDeque<Instant>>>,
    /// How long a request may stay unanswered.
    deadline: Duration,
}

impl AppendReplies {
    /// The next answer; `None` once the follower ended the stream, an error once it broke
    /// or the oldest request waited longer than the deadline (the stream ends then).
    async fn next(
        &mut self,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        loop {
            let oldest = self.sent.lock().front().copied();
            let check = oldest.unwrap_or_else(Instant::now) + self.deadline;
            tokio::select! {
                biased;
                reply = self.replies.next() => {
                    self.sent.lock().pop_front();
                    return reply.map(|reply| {
                        let reply = reply.map_err(unreachable)?;
                        let reply: StreamReply = decode(&reply.body).map_err(network_error)?;
                        reply.map_err(|fatal| unreachable(std::io::Error::other(fatal)))
                    });
                }
                () = tokio::time::sleep_until(check.into()) => {
                    if oldest.is_some_and(|at| at.elapsed() >= self.deadline) {
                        return Some(Err(network_error(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "an append request went unanswered",
                        ))));
                    }
                }
            }
        }
    }
}

impl Link for Connection {
    async fn held(&mut self, request: HeldRequest, ttl: Duration) -> Result<TransferReply, String> {
        self.transfer(KIND_SNAPSHOT_HELD, &request, ttl).await
    }

    async fn chunk(
        &mut self,
        request: ChunkRequest,
        ttl: Duration,
    ) -> Result<TransferReply, String> {
        self.transfer(KIND_SNAPSHOT_CHUNK, &request, ttl).await
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(KIND_APPEND, &rpc, &option).await
    }

    /// Pipelined: every request goes out as openraft makes it, over one stream (see the
    /// module docs); openraft's default sends one and waits for its answer.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            // Opened once openraft has a request: it makes the request after its backoff
            // (a peer that is down is not called again at once), and a session with
            // nothing to send opens no stream.
            let mut input = input;
            let Some(first) = input.next().await else {
                let nothing: BoxStream<'s, _> = Box::pin(futures_util::stream::empty());
                return Ok(nothing);
            };
            let input = futures_util::stream::once(std::future::ready(first)).chain(input);
            let replies = self.open_append_stream(input, option).await?;
            // Ends after the first error or refusal (a conflict, a higher vote), as
            // openraft expects.
            let answers = futures_util::stream::unfold(Some(replies), |replies| async move {
                let mut replies = replies?;
                let answer = replies.next().await?;
                let go_on = matches!(answer, Ok(Ok(_)));
                Some((answer, go_on.then_some(replies)))
            });
            let answers: BoxStream<'s, _> = Box::pin(answers);
            Ok(answers)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(KIND_VOTE, &rpc, &option).await
    }

    /// The resumable transfer ([`snapshot_transfer`]) instead of openraft's chunks, which
    /// start again from 0 after a cut.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        snapshot_transfer::send(self, vote, snapshot, cancel, Pace::of(&option)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two call kinds on one number made a hand-off request arrive as a liveness beat.
    #[test]
    fn call_kinds_are_distinct() {
        let kinds = [
            KIND_VOTE,
            KIND_APPEND,
            KIND_SNAPSHOT,
            KIND_BEAT,
            KIND_ELECT,
            KIND_KNOWN,
            KIND_SNAPSHOT_HELD,
            KIND_SNAPSHOT_CHUNK,
            KIND_APPEND_STREAM,
            KIND_GROUP_TERM,
        ];
        let distinct: std::collections::BTreeSet<u32> = kinds.into_iter().collect();
        assert_eq!(distinct.len(), kinds.len());
    }
}
