//! The classic group membership protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup),
//! in memory: members, generations, the leader's assignment.
//!
//! States as in Kafka: `Empty` → a join starts `PreparingRebalance`, which ends when every
//! known member has rejoined (or at the rebalance deadline, without those that did not);
//! then `CompletingRebalance` until the leader's SyncGroup hands out the assignment, then
//! `Stable`. A member silent past its session timeout is removed and the others
//! rebalance. Pending JoinGroup and SyncGroup calls wait on a oneshot each; the periodic
//! [`Coordinator::tick`] ends deadlines and sessions. The assignment itself is the
//! clients' business (the leader computes it); offsets live in qit's groups
//! ([`super::offsets`]), so a restart loses only memberships, and clients rejoin.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, FindCoordinatorRequest, FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    OffsetCommitResponse, OffsetFetchResponse, RequestKind, ResponseKind, SyncGroupRequest,
    SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::brokers::Layout;

/// How often deadlines and sessions are checked.
const TICK: Duration = Duration::from_millis(100);
/// Bounds on the timeouts a member may ask for.
const MIN_SESSION: Duration = Duration::from_millis(1000);
const MAX_SESSION: Duration = Duration::from_secs(300);
/// How long a group that was empty waits for more members before its first generation
/// (Kafka's `group.initial.rebalance.delay.ms`, 3 s there): consumers started together
/// join one generation, and a leader has its topic metadata before it assigns.
const INITIAL_REBALANCE_DELAY: Duration = Duration::from_millis(1000);
/// Most groups held; past it new groups are refused.
const MAX_GROUPS: usize = 10_000;
/// Most members of one group.
const MAX_MEMBERS: usize = 1_000;

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// FindCoordinator: the node that coordinates each asked group ([`Layout::coordinator`];
/// this node on a single node).
pub fn find(
    layout: &Layout,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let mut response = FindCoordinatorResponse::default();
    if version >= 4 {
        response.coordinators = request
            .coordinator_keys
            .into_iter()
            .map(|key| {
                let entry = CoordinatorEntry::default();
                match layout.broker(layout.coordinator(key.as_str())) {
                    Some(broker) => entry
                        .with_node_id(BrokerId(broker.id))
                        .with_host(text(&broker.host))
                        .with_port(broker.port),
                    None => entry
                        .with_node_id(BrokerId(-1))
                        .with_error_code(ResponseError::CoordinatorNotAvailable.code()),
                }
                .with_key(key)
            })
            .collect();
    } else {
        match layout.broker(layout.coordinator(request.key.as_str())) {
            Some(broker) => {
                response.node_id = BrokerId(broker.id);
                response.host = text(&broker.host);
                response.port = broker.port;
            }
            None => {
                response.node_id = BrokerId(-1);
                response.error_code = ResponseError::CoordinatorNotAvailable.code();
            }
        }
    }
    response
}

/// The consumer group a group request names (`None` for other requests).
pub fn group_of(request: &RequestKind) -> Option<&str> {
    let group = match request {
        RequestKind::JoinGroup(r) => &r.group_id,
        RequestKind::SyncGroup(r) => &r.group_id,
        RequestKind::Heartbeat(r) => &r.group_id,
        RequestKind::LeaveGroup(r) => &r.group_id,
        RequestKind::OffsetCommit(r) => &r.group_id,
        RequestKind::OffsetFetch(r) => &r.group_id,
        _ => return None,
    };
    Some(group.0.as_str())
}

/// The answer to a group request sent to a node that does not coordinate the group:
/// `NOT_COORDINATOR`, on which clients look the coordinator up again.
pub fn not_coordinator(request: RequestKind, version: i16) -> Option<ResponseKind> {
    let code = ResponseError::NotCoordinator.code();
    Some(match request {
        RequestKind::JoinGroup(r) => ResponseKind::JoinGroup(join_error(
            ResponseError::NotCoordinator,
            r.member_id.as_str(),
        )),
        RequestKind::SyncGroup(_) => {
            ResponseKind::SyncGroup(sync_error(ResponseError::NotCoordinator))
        }
        RequestKind::Heartbeat(_) => {
            ResponseKind::Heartbeat(HeartbeatResponse::default().with_error_code(code))
        }
        RequestKind::LeaveGroup(_) => {
            ResponseKind::LeaveGroup(LeaveGroupResponse::default().with_error_code(code))
        }
        RequestKind::OffsetCommit(r) => {
            let mut response = OffsetCommitResponse::default();
            response.topics = r
                .topics
                .into_iter()
                .map(|t| {
                    OffsetCommitResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partitions
                                .into_iter()
                                .map(|p| {
                                    OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            ResponseKind::OffsetCommit(response)
        }
        RequestKind::OffsetFetch(r) => {
            let mut response = OffsetFetchResponse::default();
            if version >= 2 {
                response.error_code = code;
            }
            response.topics = r
                .topics
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    OffsetFetchResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partition_indexes
                                .into_iter()
                                .map(|p| {
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(-1)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            ResponseKind::OffsetFetch(response)
        }
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    PreparingRebalance { deadline: Instant },
    CompletingRebalance,
    Stable,
}

impl State {
    /// Kafka's name of the state (ListGroups, DescribeGroups).
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance { .. } => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

/// Who a member is: the client id of its JoinGroup's request header and the host it
/// connected from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    /// The client id.
    pub id: String,
    /// The client's address.
    pub host: String,
}

/// A group with members, as DescribeGroups tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// Kafka's name of the group's state.
    pub state: &'static str,
    /// The protocol type its members joined with (`consumer` for consumers).
    pub protocol_type: String,
    /// The protocol (assignor) chosen, empty before the first generation.
    pub protocol: String,
    /// The members.
    pub members: Vec<MemberView>,
}

/// A member as DescribeGroups tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Member id.
    pub id: String,
    /// Its client id and host.
    pub client: Client,
    /// Its metadata for the chosen protocol (a consumer's subscription).
    pub metadata: Bytes,
    /// Its assignment in the current generation.
    pub assignment: Bytes,
}

struct Member {
    /// The client id and host it joined from (as DescribeGroups tells them).
    client: Client,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    last_seen: Instant,
    joining: Option<oneshot::Sender<JoinGroupResponse>>,
    syncing: Option<oneshot::Sender<SyncGroupResponse>>,
    assignment: Bytes,
}

impl Member {
    /// The member's metadata for `protocol` (empty when it did not offer it).
    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, meta)| meta.clone())
            .unwrap_or_default()
    }
}

struct Group {
    state: State,
    generation: i32,
    protocol_type: String,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// The join phase of a group that was empty ends no earlier than this.
    not_before: Option<Instant>,
}

impl Group {
    fn new() -> Self {
        Self {
            state: State::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            not_before: None,
        }
    }

    fn view(&self) -> GroupView {
        let protocol = self.protocol.clone().unwrap_or_default();
        let members = self
            .members
            .iter()
            .map(|(id, m)| MemberView {
                id: id.clone(),
                client: m.client.clone(),
                metadata: m.metadata(&protocol),
                assignment: m.assignment.clone(),
            })
            .collect();
        GroupView {
            state: self.state.name(),
            protocol_type: self.protocol_type.clone(),
            protocol,
            members,
        }
    }

    /// Starts a rebalance (if not already preparing one): every member must rejoin.
    fn prepare_rebalance(&mut self, now: Instant) {
        if matches!(self.state, State::PreparingRebalance { .. }) {
            return;
        }
        self.not_before = (self.state == State::Empty).then(|| now + INITIAL_REBALANCE_DELAY);
        let longest = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(MIN_SESSION);
        self.state = State::PreparingRebalance {
            deadline: now + longest,
        };
        // Members waiting for an assignment of the old generation must rejoin.
        for member in self.members.values_mut() {
            if let Some(tx) = member.syncing.take() {
                let _ = tx.send(sync_error(ResponseError::RebalanceInProgress));
            }
        }
    }

    /// Ends the join phase when every member has rejoined (or `force`, dropping those
    /// that did not).
    fn try_complete_join(&mut self, force: bool) {
        if !matches!(self.state, State::PreparingRebalance { .. }) {
            return;
        }
        if force {
            self.members.retain(|_, m| m.joining.is_some());
        }
        if self.members.is_empty() {
            self.state = State::Empty;
            self.leader = None;
            self.protocol = None;
            return;
        }
        if self.members.values().any(|m| m.joining.is_none()) {
            return;
        }
        if !force && self.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.not_before = None;
        self.generation = self.generation.wrapping_add(1).max(1);
        let leader = match &self.leader {
            Some(l) if self.members.contains_key(l) => l.clone(),
            _ => self.members.keys().next().cloned().unwrap_or_default(),
        };
        self.leader = Some(leader.clone());
        self.protocol = self.choose_protocol(&leader);
        let Some(protocol) = self.protocol.clone() else {
            for member in self.members.values_mut() {
                if let Some(tx) = member.joining.take() {
                    let _ = tx.send(join_error(ResponseError::InconsistentGroupProtocol, ""));
                }
            }
            self.members.clear();
            self.state = State::Empty;
            return;
        };
        self.state = State::CompletingRebalance;
        let all: Vec<JoinGroupResponseMember> = self
            .members
            .iter()
            .map(|(id, m)| {
                JoinGroupResponseMember::default()
                    .with_member_id(text(id))
                    .with_metadata(m.metadata(&protocol))
            })
            .collect();
        let now = Instant::now();
        for (id, member) in self.members.iter_mut() {
            member.last_seen = now;
            let Some(tx) = member.joining.take() else {
                continue;
            };
            let mut response = JoinGroupResponse::default()
                .with_generation_id(self.generation)
                .with_protocol_type(Some(text(&self.protocol_type)))
                .with_protocol_name(Some(text(&protocol)))
                .with_leader(text(&leader))
                .with_member_id(text(id));
            if *id == leader {
                response.members = all.clone();
            }
            let _ = tx.send(response);
        }
    }

    /// The leader's first protocol that every member supports.
    fn choose_protocol(&self, leader: &str) -> Option<String> {
        let leader = self.members.get(leader)?;
        leader
            .protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned()
    }

    /// Removes members whose session ran out (not those waiting in a join), and ends
    /// a rebalance whose deadline passed.
    fn tick(&mut self, now: Instant) {
        let before = self.members.len();
        self.members
            .retain(|_, m| m.joining.is_some() || now < m.last_seen + m.session_timeout);
        if self.members.len() != before {
            if self.members.is_empty() && self.state != State::Empty {
                self.state = State::Empty;
                self.leader = None;
                self.protocol = None;
            } else {
                self.prepare_rebalance(now);
            }
        }
        if let State::PreparingRebalance { deadline } = self.state {
            self.try_complete_join(now >= deadline);
        }
    }

    fn remove(&mut self, member: &str, now: Instant) -> bool {
        let Some(mut gone) = self.members.remove(member) else {
            return false;
        };
        if let Some(tx) = gone.joining.take() {
            let _ = tx.send(join_error(ResponseError::UnknownMemberId, member));
        }
        if self.members.is_empty() {
            self.state = State::Empty;
            self.leader = None;
            self.protocol = None;
        } else {
            self.prepare_rebalance(now);
            self.try_complete_join(false);
        }
        true
    }
}

fn join_error(error: ResponseError, member: &str) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(error.code())
        .with_generation_id(-1)
        .with_member_id(text(member))
}

fn sync_error(error: ResponseError) -> SyncGroupResponse {
    SyncGroupResponse::default().with_error_code(error.code())
}

/// The groups this broker coordinates.
#[derive(Default)]
pub struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
    next_member: AtomicU64,
}

impl Coordinator {
    /// Checks deadlines and sessions every [`TICK`] until `stop`.
    pub async fn run(&self, stop: CancellationToken) {
        let mut every = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick(Instant::now()),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One check of every group; empty groups are forgotten.
    pub fn tick(&self, now: Instant) {
        let mut groups = self.groups.lock();
        for group in groups.values_mut() {
            group.tick(now);
        }
        groups.retain(|_, g| g.state != State::Empty || !g.members.is_empty());
    }

    /// JoinGroup: waits until the rebalance completes (or the member is refused).
    pub async fn join(&self, request: JoinGroupRequest, client: Client) -> JoinGroupResponse {
        let rx = match self.enter(&request, client) {
            Ok(rx) => rx,
            Err(response) => return *response,
        };
        rx.await.unwrap_or_else(|_| {
            join_error(ResponseError::UnknownMemberId, request.member_id.as_str())
        })
    }

    fn enter(
        &self,
        request: &JoinGroupRequest,
        client: Client,
    ) -> Result<oneshot::Receiver<JoinGroupResponse>, Box<JoinGroupResponse>> {
        let group_id = request.group_id.0.to_string();
        let member_id = request.member_id.to_string();
        let refuse = |e: ResponseError| Err(Box::new(join_error(e, &member_id)));
        if group_id.is_empty() {
            return refuse(ResponseError::InvalidGroupId);
        }
        let session = Duration::from_millis(u64::try_from(request.session_timeout_ms).unwrap_or(0));
        if !(MIN_SESSION..=MAX_SESSION).contains(&session) {
            return refuse(ResponseError::InvalidSessionTimeout);
        }
        let rebalance = u64::try_from(request.rebalance_timeout_ms)
            .map_or(session, Duration::from_millis)
            .clamp(MIN_SESSION, MAX_SESSION);
        if request.protocol_type.is_empty() || request.protocols.is_empty() {
            return refuse(ResponseError::InconsistentGroupProtocol);
        }
        let mut groups = self.groups.lock();
        if !groups.contains_key(&group_id) && groups.len() >= MAX_GROUPS {
            return refuse(ResponseError::CoordinatorNotAvailable);
        }
        let group = groups.entry(group_id.clone()).or_insert_with(Group::new);
        if !group.members.is_empty() && group.protocol_type != request.protocol_type.as_str() {
            return refuse(ResponseError::InconsistentGroupProtocol);
        }
        let id = if member_id.is_empty() {
            if group.members.len() >= MAX_MEMBERS {
                return refuse(ResponseError::GroupMaxSizeReached);
            }
            let n = self.next_member.fetch_add(1, Ordering::Relaxed);
            format!("{group_id}-member-{n}-{:08x}", rand::random::<u32>())
        } else if group.members.contains_key(&member_id) {
            member_id.clone()
        } else {
            return refuse(ResponseError::UnknownMemberId);
        };
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let protocols = request
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect();
        group.protocol_type = request.protocol_type.to_string();
        let member = group.members.entry(id).or_insert_with(|| Member {
            client: Client::default(),
            session_timeout: session,
            rebalance_timeout: rebalance,
            protocols: Vec::new(),
            last_seen: now,
            joining: None,
            syncing: None,
            assignment: Bytes::new(),
        });
        member.client = client;
        member.session_timeout = session;
        member.rebalance_timeout = rebalance;
        member.protocols = protocols;
        member.last_seen = now;
        if let Some(old) = member.joining.replace(tx) {
            let _ = old.send(join_error(ResponseError::RebalanceInProgress, ""));
        }
        group.prepare_rebalance(now);
        group.try_complete_join(false);
        Ok(rx)
    }

    /// SyncGroup: the leader hands out the assignment; the others wait for theirs.
    pub async fn sync(&self, request: SyncGroupRequest) -> SyncGroupResponse {
        let rx = {
            let mut groups = self.groups.lock();
            let member_id = request.member_id.to_string();
            let Some(group) = groups.get_mut(request.group_id.0.as_str()) else {
                return sync_error(ResponseError::UnknownMemberId);
            };
            let protocol = group.protocol.clone().map(|p| text(&p));
            let protocol_type = Some(text(&group.protocol_type));
            let ok = |assignment: Bytes| {
                SyncGroupResponse::default()
                    .with_protocol_type(protocol_type.clone())
                    .with_protocol_name(protocol.clone())
                    .with_assignment(assignment)
            };
            if !group.members.contains_key(&member_id) {
                return sync_error(ResponseError::UnknownMemberId);
            }
            if request.generation_id != group.generation {
                return sync_error(ResponseError::IllegalGeneration);
            }
            match group.state {
                State::PreparingRebalance { .. } | State::Empty => {
                    return sync_error(ResponseError::RebalanceInProgress);
                }
                State::Stable => {
                    return ok(group
                        .members
                        .get(&member_id)
                        .map(|m| m.assignment.clone())
                        .unwrap_or_default());
                }
                State::CompletingRebalance => {}
            }
            if group.leader.as_deref() == Some(member_id.as_str()) {
                let mut given: HashMap<String, Bytes> = request
                    .assignments
                    .into_iter()
                    .map(|a| (a.member_id.to_string(), a.assignment))
                    .collect();
                let now = Instant::now();
                for (id, member) in group.members.iter_mut() {
                    member.assignment = given.remove(id).unwrap_or_default();
                    member.last_seen = now;
                    if let Some(tx) = member.syncing.take() {
                        let _ = tx.send(ok(member.assignment.clone()));
                    }
                }
                group.state = State::Stable;
                return ok(group
                    .members
                    .get(&member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default());
            }
            let (tx, rx) = oneshot::channel();
            if let Some(member) = group.members.get_mut(&member_id) {
                member.last_seen = Instant::now();
                member.syncing = Some(tx);
            }
            rx
        };
        rx.await
            .unwrap_or_else(|_| sync_error(ResponseError::RebalanceInProgress))
    }

    /// Heartbeat: keeps the session; says when the member must rejoin.
    pub fn heartbeat(&self, request: &HeartbeatRequest) -> HeartbeatResponse {
        let error = self.check_member(
            request.group_id.0.as_str(),
            request.member_id.as_str(),
            request.generation_id,
        );
        HeartbeatResponse::default().with_error_code(error.map_or(0, |e| e.code()))
    }

    /// The error, if any, for a heartbeat (or commit) of `member` at `generation`.
    fn check_member(&self, group: &str, member: &str, generation: i32) -> Option<ResponseError> {
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group) else {
            return Some(ResponseError::UnknownMemberId);
        };
        let Some(m) = group.members.get_mut(member) else {
            return Some(ResponseError::UnknownMemberId);
        };
        m.last_seen = Instant::now();
        if matches!(group.state, State::PreparingRebalance { .. }) {
            return Some(ResponseError::RebalanceInProgress);
        }
        if generation != group.generation {
            return Some(ResponseError::IllegalGeneration);
        }
        None
    }

    /// Whether an OffsetCommit may go through: commits outside group management
    /// (generation -1, no member) always may; members only in their current generation.
    pub fn check_commit(
        &self,
        group: &str,
        member: &str,
        generation: i32,
    ) -> Option<ResponseError> {
        if generation < 0 && member.is_empty() {
            return None;
        }
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group) else {
            return Some(ResponseError::UnknownMemberId);
        };
        let Some(m) = g.members.get_mut(member) else {
            return Some(ResponseError::UnknownMemberId);
        };
        m.last_seen = Instant::now();
        if generation != g.generation {
            return Some(ResponseError::IllegalGeneration);
        }
        if g.state == State::CompletingRebalance {
            return Some(ResponseError::RebalanceInProgress);
        }
        None
    }

    /// LeaveGroup: the members go; the rest rebalance.
    pub fn leave(&self, request: &LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        let mut ids: Vec<String> = request
            .members
            .iter()
            .map(|m| m.member_id.to_string())
            .collect();
        if ids.is_empty() && !request.member_id.is_empty() {
            ids.push(request.member_id.to_string());
        }
        let mut groups = self.groups.lock();
        let group = groups.get_mut(request.group_id.0.as_str());
        let now = Instant::now();
        let mut response = LeaveGroupResponse::default();
        let mut any_unknown = false;
        let mut group = group;
        for id in ids {
            let known = group.as_mut().is_some_and(|g| g.remove(&id, now));
            let code = if known {
                0
            } else {
                any_unknown = true;
                ResponseError::UnknownMemberId.code()
            };
            response.members.push(
                MemberResponse::default()
                    .with_member_id(text(&id))
                    .with_error_code(code),
            );
        }
        if version < 3 {
            // Before v3 the answer has one error and no member list.
            response.members.clear();
            if any_unknown {
                response.error_code = ResponseError::UnknownMemberId.code();
            }
        }
        response
    }

    /// Every group with members now, by name.
    pub fn views(&self) -> Vec<(String, GroupView)> {
        let groups = self.groups.lock();
        groups
            .iter()
            .map(|(name, g)| (name.clone(), g.view()))
            .collect()
    }

    /// `group` as it is now, if it has members.
    pub fn view(&self, group: &str) -> Option<GroupView> {
        self.groups.lock().get(group).map(Group::view)
    }

    /// The members of `group` now (for tests and the README's claims).
    pub fn member_count(&self, group: &str) -> usize {
        self.groups.lock().get(group).map_or(0, |g| g.members.len())
    }
}
