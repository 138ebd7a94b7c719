//! The groups the broker's timer looks at: those holding leases or delayed redeliveries.
//! A group puts itself on the list when a change leaves it with a deadline, and the timer
//! takes it off once nothing is pending, so that a tick costs nothing per idle queue (ten
//! thousand idle queues, one timer).

//!
//! The list is generic over the group type so that this file needs nothing from
//! `queue.rs` (which holds the list); the re-arming rule is `Group::still_armed`.

use std::sync::Arc;

use parking_lot::Mutex;

/// The armed groups, by queue name.
pub struct Alarms<G> {
    armed: Mutex<Vec<(String, Arc<G>)>>,
}

impl<G> Default for Alarms<G> {
    fn default() -> Self {
        Self {
            armed: Mutex::new(Vec::new()),
        }
    }
}

impl<G> Alarms<G> {
    /// Adds `group` of `queue` (the caller made sure it is not on the list yet).
    pub fn arm(&self, queue: &str, group: Arc<G>) {
        self.armed.lock().push((queue.to_string(), group));
    }

    /// Takes the list for one timer pass; give back what stays armed with [`Self::keep`].
    pub fn take(&self) -> Vec<(String, Arc<G>)> {
        std::mem::take(&mut *self.armed.lock())
    }

    /// Puts back the groups a timer pass found still pending.
    pub fn keep(&self, groups: Vec<(String, Arc<G>)>) {
        self.armed.lock().extend(groups);
    }

    /// Groups on the list now.
    pub fn len(&self) -> usize {
        self.armed.lock().len()
    }

    /// True when no group is armed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
