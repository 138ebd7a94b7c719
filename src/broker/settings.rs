//! Queue settings as in the contract: defaults, JSON shape and validation.

use serde::{Deserialize, Serialize};

/// Delivery ordering within a group (defined by the group layer, a queue setting here).
pub use crate::group::Ordering;

/// Largest allowed `max_message_bytes` (64 MiB).
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

/// Settings of a queue. Every field has a default; JSON input may omit any of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// Number of partitions (>= 1).
    pub partitions: u32,
    /// Lease visibility timeout in seconds.
    pub ack_timeout: u64,
    /// Deliveries before dead-lettering; 0 = unlimited.
    pub max_deliveries: u32,
    /// Dead-letter queue name; `None` means `{queue}.dlq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Redelivery delays in seconds by delivery count (the last one repeats); empty = at once.
    pub backoff: Vec<u64>,
    /// Retention limits.
    pub retention: Retention,
    /// Keep only the newest message per key in sealed segments.
    pub compaction: bool,
    /// Most leases a group holds at once.
    pub max_in_flight: u32,
    /// Delivery ordering within a group.
    pub ordering: Ordering,
    /// Idempotency-key window in seconds.
    pub dedup_window: u64,
    /// Largest message payload in bytes.
    pub max_message_bytes: u64,
    /// Segment roll size in bytes.
    pub segment_bytes: u64,
    /// Nodes holding a copy of each partition in a cluster (1..=256, at most the cluster's
    /// nodes); unset: `min(3, nodes)`. A single node holds the one copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            partitions: 1,
            ack_timeout: 30,
            max_deliveries: 5,
            dead_letter: None,
            backoff: Vec::new(),
            retention: Retention::default(),
            compaction: false,
            max_in_flight: 10_000,
            ordering: Ordering::None,
            dedup_window: 120,
            max_message_bytes: 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            replicas: None,
        }
    }
}

/// Retention settings of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Delete sealed segments whose newest record is older than this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    /// Delete the oldest sealed segments while the partition holds more than this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Which rule applies.
    pub policy: RetentionPolicy,
}

/// Retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetentionPolicy {
    /// Only `max_age` / `max_bytes` delete data.
    #[default]
    Limits,
    /// Also delete sealed segments that every group has acknowledged past.
    Acked,
}

/// A setting that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{field}`: {reason}")]
pub struct InvalidSetting {
    /// The field name as in JSON.
    pub field: &'static str,
    /// Why it is rejected.
    pub reason: String,
}

impl QueueSettings {
    /// Checks ranges; returns the first offending field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |field, reason: &str| {
            Err(InvalidSetting {
                field,
                reason: reason.to_string(),
            })
        };
        if !(1..=256).contains(&self.partitions) {
            return bad("partitions", "must be 1..=256");
        }
        if !(1..=43_200).contains(&self.ack_timeout) {
            return bad("ack_timeout", "must be 1..=43200 seconds");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1_000_000 {
            return bad("max_in_flight", "must be 1..=1000000");
        }
        if self.backoff.len() > 64 || self.backoff.iter().any(|s| *s > 43_200) {
            return bad("backoff", "at most 64 entries of 0..=43200 seconds");
        }
        if self.dedup_window > 7 * 24 * 3600 {
            return bad("dedup_window", "must be at most 604800 seconds");
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return bad("max_message_bytes", "must be 1..=67108864");
        }
        if self.segment_bytes < 4096 || self.segment_bytes > 4 * 1024 * 1024 * 1024 {
            return bad("segment_bytes", "must be 4096..=4294967296");
        }
        if let Some(dlq) = &self.dead_letter
            && let Err(e) = crate::name::check(dlq)
        {
            return Err(InvalidSetting {
                field: "dead_letter",
                reason: e.to_string(),
            });
        }
        if self.retention.max_bytes == Some(0) {
            return bad("retention.max_bytes", "must be positive");
        }
        if self.replicas.is_some_and(|r| !(1..=256).contains(&r)) {
            return bad("replicas", "must be 1..=256");
        }
        Ok(())
    }

    /// These settings with defaults that depend on the queue's name filled in (the
    /// dead-letter queue's name, when messages can be dead-lettered), as stored and shown.
    pub fn effective(mut self, queue: &str) -> Self {
        if self.max_deliveries > 0 {
            self.dead_letter = Some(self.dead_letter_name(queue));
        }
        self
    }

    /// The dead-letter queue's name for queue `queue`.
    pub fn dead_letter_name(&self, queue: &str) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{queue}.dlq"))
    }

    /// Redelivery delay in seconds after the `delivery_count`-th delivery failed.
    pub fn backoff_secs(&self, delivery_count: u32) -> u64 {
        let index = (delivery_count.max(1) - 1) as usize;
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_gives_defaults() {
        let s: QueueSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s, QueueSettings::default());
        s.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_rejected() {
        assert!(serde_json::from_str::<QueueSettings>(r#"{"partitons":2}"#).is_err());
    }

    #[test]
    fn out_of_range_is_named() {
        let s = QueueSettings {
            partitions: 0,
            ..QueueSettings::default()
        };
        assert_eq!(s.validate().unwrap_err().field, "partitions");
    }

    #[test]
    fn backoff_repeats_last() {
        let s = QueueSettings {
            backoff: vec![1, 5, 30],
            ..QueueSettings::default()
        };
        assert_eq!(s.backoff_secs(1), 1);
        assert_eq!(s.backoff_secs(3), 30);
        assert_eq!(s.backoff_secs(9), 30);
        assert_eq!(QueueSettings::default().backoff_secs(2), 0);
    }
}
