//! Talking to the other nodes: one lazily connected HTTP/2 channel per peer, shared by
//! every Raft group, by the node's beats ([`super::liveness`]) and by forwarded ops, each
//! call signed with the cluster secret; and openraft's [`RaftNetworkFactory`] over it, one
//! per group. A call to a node that is gone fails fast: connecting gives up after
//! [`CONNECT_TIMEOUT`], and every call has a deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, Snapshot, Vote};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::ClusterError;
use super::auth::{MAC_KEY, Secret, TS_KEY, now_ms};
use super::snapshot_transfer::{self, ChunkRequest, HeldRequest, Link, Pace, TransferReply};
use super::types::{TypeConfig, decode, encode};
use crate::proto::cluster::cluster_client::ClusterClient;
use crate::proto::cluster::{ForwardRequest, RaftRequest};

/// Kind of a Raft RPC: vote.
pub const KIND_VOTE: u32 = 1;
/// Kind of a Raft RPC: append entries.
pub const KIND_APPEND: u32 = 2;
/// Kind of a Raft RPC: install snapshot.
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
        let ts = now_ms();
        let proof = self
            .secret
            .sign(ts, &scope(method, group, self.node_id), &body);
        let mut request = tonic::Request::new(message(body.into()));
        let meta = request.metadata_mut();
        if let (Ok(ts), Ok(proof), Ok(node)) = (
            ts.to_string().parse(),
            proof.parse(),
            self.node_id.to_string().parse(),
        ) {
            meta.insert(TS_KEY, ts);
            meta.insert(MAC_KEY, proof);
            meta.insert(NODE_KEY, node);
        }
        request
    }

    fn peer(&self, target: u64) -> Result<Arc<Peer>, tonic::Status> {
        self.peers
            .read()
            .get(&target)
            .cloned()
            .ok_or_else(|| tonic::Status::not_found(format!("node {target} is not a peer")))
    }

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

impl Connection {
    async fn call<Req, Resp, E>(
        &self,
        kind: u32,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self
            .peers
            .raft(self.target, self.group, kind, body, option.hard_ttl())
            .await
            .map_err(|status| RPCError::Unreachable(Unreachable::new(&status)))?;
        let result: Result<Resp, RaftError<u64, E>> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
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

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(KIND_APPEND, &rpc, &option).await
    }

    /// openraft's chunk call, which its own transport would send; qit sends snapshots with
    /// [`RaftNetwork::full_snapshot`] below (a node of an older version still answers it).
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(KIND_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(KIND_VOTE, &rpc, &option).await
    }

    /// The resumable transfer ([`snapshot_transfer`]) instead of openraft's chunks, which
    /// start again from 0 after a cut.
    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
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
        ];
        let distinct: std::collections::BTreeSet<u32> = kinds.into_iter().collect();
        assert_eq!(distinct.len(), kinds.len());
    }
}
