//! ListGroups, DescribeGroups and DeleteGroups: the consumer groups this broker
//! coordinates, as Kafka's admin tools (`kafka-consumer-groups`, the AdminClients) list,
//! describe and delete them.
//!
//! A group is listed when it has members here (the classic protocol's state, members,
//! client ids and assignments, see [`super::coordinator`]), or when qit has it on a queue
//! (its committed offsets live there, see [`super::offsets`]): such a group is `Empty`,
//! as Kafka lists a group whose members left while its offsets stay, and a qit group that
//! HTTP and gRPC consumers use is the same thing to a Kafka client. On a cluster every
//! node answers for the groups it coordinates, as in Kafka (an admin client asks every
//! broker and merges the lists), and reads which groups a queue has on the queue's leader:
//! a node may hold no replica of the queue, and the leader is where a group is made (a
//! follower's copy learns of it from the first replicated entry that names it).
//!
//! With auth on, a user sees only the groups that qit has on queues the user may consume
//! (qit's grants are on queues, not on groups); describing another group answers
//! `GROUP_AUTHORIZATION_FAILED`.
//!
//! Deleting a group deletes qit's group of that name on every queue that has it (as
//! `DELETE /queues/{q}/groups/{g}` does one), so its committed offsets go. As in Kafka, a
//! group with members is refused (`NON_EMPTY_GROUP`), and so is one with messages leased
//! through HTTP or gRPC; with auth on, the user must be allowed to consume every queue
//! that has the group. Which queues have it is read as for the listing.

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    GroupId, ListGroupsRequest, ListGroupsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::Kafka;
use super::brokers::Layout;
use super::coordinator::GroupView;
use crate::auth::Action;

/// The protocol type of a group qit has without members here.
const CONSUMER: &str = "consumer";
/// What DescribeGroups says of a group nobody has.
const DEAD: &str = "Dead";
/// `authorized_operations` when they were not asked for (Kafka's `INT32_MIN`).
const NOT_ASKED: i32 = i32::MIN;

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// The names of the groups qit has on each of `queues`, as
/// [`Broker::current_queue_infos`](crate::broker::Broker::current_queue_infos) reads them:
/// each queue's leader's on a cluster (see the module doc), this node's own otherwise. A
/// queue deleted meanwhile is left out.
async fn groups_by_queue(kafka: &Kafka, queues: Vec<String>) -> Vec<(String, Vec<String>)> {
    let broker = &kafka.broker;
    let infos = queues
        .iter()
        .filter_map(|queue| broker.queue_info(queue).ok())
        .collect();
    broker
        .current_queue_infos(infos)
        .await
        .into_iter()
        .map(|info| (info.name, info.groups.into_iter().map(|g| g.name).collect()))
        .collect()
}

/// The groups qit has on the queues `user` may consume.
async fn qit_groups(kafka: &Kafka, user: Option<&str>) -> BTreeSet<String> {
    let queues = kafka
        .broker
        .queue_names()
        .into_iter()
        .filter(|queue| kafka.allow(user, Action::Consume, queue).is_ok())
        .collect();
    groups_by_queue(kafka, queues)
        .await
        .into_iter()
        .flat_map(|(_, groups)| groups)
        .collect()
}

/// Whether `user` may see `group`.
fn visible(kafka: &Kafka, qit: &BTreeSet<String>, group: &str) -> bool {
    kafka.auth.is_none() || qit.contains(group)
}

/// A group without members here: `Empty` when qit has it, else nobody has it.
fn memberless(in_qit: bool) -> GroupView {
    GroupView {
        state: if in_qit { "Empty" } else { DEAD },
        protocol_type: if in_qit { CONSUMER } else { "" }.to_string(),
        protocol: String::new(),
        members: Vec::new(),
    }
}

/// ListGroups (v0-4): every group this node coordinates that `user` may see, of the
/// asked states (all when none are asked; v4 and later).
pub async fn list(
    kafka: &Kafka,
    layout: &Layout,
    user: Option<&str>,
    request: &ListGroupsRequest,
) -> ListGroupsResponse {
    let qit = qit_groups(kafka, user).await;
    let mut groups: Vec<(String, GroupView)> = kafka.groups.views();
    let active: BTreeSet<String> = groups.iter().map(|(name, _)| name.clone()).collect();
    groups.extend(
        qit.iter()
            .filter(|name| !active.contains(*name))
            .map(|name| (name.clone(), memberless(true))),
    );
    groups.retain(|(name, view)| {
        layout.coordinates(name)
            && visible(kafka, &qit, name)
            && (request.states_filter.is_empty()
                || request
                    .states_filter
                    .iter()
                    .any(|s| s.as_str().eq_ignore_ascii_case(view.state)))
    });
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let mut response = ListGroupsResponse::default();
    response.groups = groups
        .into_iter()
        .map(|(name, view)| {
            ListedGroup::default()
                .with_group_id(GroupId(text(&name)))
                .with_protocol_type(text(&view.protocol_type))
                .with_group_state(text(view.state))
        })
        .collect();
    response
}

/// DescribeGroups (v0-5): each asked group's state, protocol and members; a group this
/// node does not coordinate answers `NOT_COORDINATOR` (the client looks it up again).
pub async fn describe(
    kafka: &Kafka,
    layout: &Layout,
    user: Option<&str>,
    request: &DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let qit = qit_groups(kafka, user).await;
    let mut response = DescribeGroupsResponse::default();
    for group in &request.groups {
        let name = group.0.as_str();
        let described = DescribedGroup::default()
            .with_group_id(group.clone())
            .with_authorized_operations(NOT_ASKED);
        let refused = if !layout.coordinates(name) {
            Some(ResponseError::NotCoordinator)
        } else if !visible(kafka, &qit, name) {
            Some(ResponseError::GroupAuthorizationFailed)
        } else {
            None
        };
        if let Some(error) = refused {
            response.groups.push(
                described
                    .with_error_code(error.code())
                    .with_group_state(text(DEAD)),
            );
            continue;
        }
        let view = kafka
            .groups
            .view(name)
            .unwrap_or_else(|| memberless(qit.contains(name)));
        let members = view
            .members
            .into_iter()
            .map(|m| {
                DescribedGroupMember::default()
                    .with_member_id(text(&m.id))
                    .with_client_id(text(&m.client.id))
                    .with_client_host(text(&m.client.host))
                    .with_member_metadata(m.metadata)
                    .with_member_assignment(m.assignment)
            })
            .collect();
        response.groups.push(
            described
                .with_group_state(text(view.state))
                .with_protocol_type(text(&view.protocol_type))
                .with_protocol_data(text(&view.protocol))
                .with_members(members),
        );
    }
    response
}

/// DeleteGroups (v0-2): each asked group, deleted on every queue that has it (see the
/// module doc); a group this node does not coordinate answers `NOT_COORDINATOR`.
pub async fn delete(
    kafka: &Kafka,
    layout: &Layout,
    user: Option<&str>,
    request: &DeleteGroupsRequest,
) -> DeleteGroupsResponse {
    let holders = holders(kafka, request).await;
    let mut response = DeleteGroupsResponse::default();
    for group in &request.groups_names {
        let name = group.0.as_str();
        let queues = holders.get(name).map_or(&[][..], Vec::as_slice);
        let error = delete_one(kafka, layout, user, name, queues).await;
        response.results.push(
            DeletableGroupResult::default()
                .with_group_id(group.clone())
                .with_error_code(error.map_or(0, |e| e.code())),
        );
    }
    response
}

/// The queues that have each group the request names (read as for the listing): one pass
/// over the queues, however many groups the request names.
async fn holders(kafka: &Kafka, request: &DeleteGroupsRequest) -> BTreeMap<String, Vec<String>> {
    let asked: BTreeSet<&str> = request.groups_names.iter().map(|g| g.0.as_str()).collect();
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (queue, groups) in groups_by_queue(kafka, kafka.broker.queue_names()).await {
        for group in groups {
            if asked.contains(group.as_str()) {
                holders.entry(group).or_default().push(queue.clone());
            }
        }
    }
    holders
}

/// Deletes one group from `queues`, the queues that have it; the error to answer, if any.
async fn delete_one(
    kafka: &Kafka,
    layout: &Layout,
    user: Option<&str>,
    name: &str,
    queues: &[String],
) -> Option<ResponseError> {
    if !layout.coordinates(name) {
        return Some(ResponseError::NotCoordinator);
    }
    if crate::name::check(name).is_err() {
        return Some(ResponseError::InvalidGroupId);
    }
    if kafka
        .groups
        .view(name)
        .is_some_and(|view| !view.members.is_empty())
    {
        return Some(ResponseError::NonEmptyGroup);
    }
    if queues
        .iter()
        .any(|queue| kafka.allow(user, Action::Consume, queue).is_err())
    {
        return Some(ResponseError::GroupAuthorizationFailed);
    }
    if queues.is_empty() {
        return Some(ResponseError::GroupIdNotFound);
    }
    for queue in queues {
        match kafka.broker.delete_group(queue, name).await {
            // Deleted meanwhile (another admin, the queue itself): nothing left to delete.
            Err(e) if matches!(e.code(), "group_not_found" | "queue_not_found") => {}
            Err(e) => return Some(super::broker_error(&e)),
            Ok(()) => {}
        }
    }
    None
}
