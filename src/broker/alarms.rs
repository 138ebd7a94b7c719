//! The groups the broker's timer looks at: those holding leases or delayed redeliveries.
//! A group puts itself on the list when a change leaves it with a deadline, and the timer
//! takes it off once nothing is pending, so that a tick costs nothing per idle queue (ten
//! thousand idle queues, one timer).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use super::queue::Group;

/// The armed groups, by queue name.
#[derive(Default)]
pub struct Alarms {
    armed: Mutex<Vec<(String, Arc<Group>)>>,
}

impl Alarms {
    /// Adds `group` of `queue` (the caller made sure it is not on the list yet).
    pub fn arm(&self, queue: &str, group: Arc<Group>) {
        self.armed.lock().push((queue.to_string(), group));
    }

    /// Takes the list for one timer pass; give back what stays armed with [`Self::keep`].
    pub fn take(&self) -> Vec<(String, Arc<Group>)> {
        std::mem::take(&mut *self.armed.lock())
    }

    /// Puts back the groups a timer pass found still pending.
    pub fn keep(&self, groups: Vec<(String, Arc<Group>)>) {
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

/// Whether a group taken off the list by a timer pass stays on it: disarms it, then arms
/// it again if it still has a deadline. True when this call re-armed it (the caller keeps
/// it); false when it is idle or a concurrent change already put it back on the list.
pub fn still_armed(group: &Group) -> bool {
    group.armed_flag().store(false, Ordering::Release);
    group.has_timers() && !group.armed_flag().swap(true, Ordering::AcqRel)
}
