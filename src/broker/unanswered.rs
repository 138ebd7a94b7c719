//! Leases granted to a receive whose answer may never reach its consumer.
//!
//! A cluster leader grants a receive's leases and then confirms with a quorum that it still
//! leads before it answers. That confirmation is a network round; when the caller goes
//! away meanwhile (a consumer's stream ends while its next lease is under way, a follower
//! drops the call it forwarded), the receive is dropped with its leases granted, and those
//! messages would wait out their whole lease (the queue's `ack_timeout`, up to 12 hours)
//! before any consumer got them. An [`Unanswered`] held across that wait gives them back
//! to the group when it is dropped, as a nack without delay does.

use std::sync::Arc;

use super::{Broker, MessageId};

/// Leases of one receive that is not answered yet: dropped, they go back to the group at
/// once; [`Unanswered::answered`] keeps them.
#[must_use = "dropping it at once gives the leases back"]
pub struct Unanswered {
    broker: Arc<Broker>,
    queue: String,
    group: String,
    ids: Vec<MessageId>,
}

impl Unanswered {
    /// Holds the leases `ids` that a receive of `group` on `queue` was granted.
    pub fn new(broker: &Arc<Broker>, queue: &str, group: &str, ids: Vec<MessageId>) -> Self {
        Self {
            broker: Arc::clone(broker),
            queue: queue.to_string(),
            group: group.to_string(),
            ids,
        }
    }

    /// The receive's fate is settled (it is answered, or its leases are left to lapse):
    /// the leases stay as they are.
    pub fn answered(mut self) {
        self.ids.clear();
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.broker
                .return_unanswered(&self.queue, &self.group, &self.ids);
        }
    }
}

impl Broker {
    /// Gives leases that were granted but never handed to a consumer back to the group at
    /// once, as a nack without delay does (the delivery still counts, as it would had the
    /// lease run out). Ids that are no longer leased, and a queue or group that is gone,
    /// are skipped.
    fn return_unanswered(&self, queue: &str, group: &str, ids: &[MessageId]) {
        let Ok(q) = self.queue(queue) else { return };
        let Some(g) = q.group(group) else { return };
        let ended = q.release(&g, ids);
        let returned = ended.counts.len();
        self.dispatch(&q, &g, ended);
        tracing::debug!(
            queue,
            group,
            returned,
            "leases of an unanswered receive returned"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::broker::testing::broker_with_queue;

    async fn leased(broker: &Broker, queue: &str, max: usize) -> Vec<MessageId> {
        broker
            .receive(queue, "g", max, Duration::ZERO, None)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect()
    }

    #[tokio::test]
    async fn dropped_unanswered_leases_go_back_at_once_and_answered_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker_with_queue(dir.path(), "q", 3).await;
        let first = leased(&broker, "q", 2).await;
        assert_eq!(first.len(), 2);
        drop(Unanswered::new(&broker, "q", "g", first.clone()));
        // Back at once (the queue's lease is 30 s): the next receive gets them again.
        let again = leased(&broker, "q", 3).await;
        assert_eq!(again.len(), 3, "{again:?}");
        for id in &first {
            assert!(again.contains(id), "{id:?} not back in {again:?}");
        }
        Unanswered::new(&broker, "q", "g", again).answered();
        assert!(leased(&broker, "q", 3).await.is_empty());
        // A group or queue that is gone is skipped.
        drop(Unanswered::new(&broker, "q", "nobody", first.clone()));
        drop(Unanswered::new(&broker, "gone", "g", first));
    }
}
