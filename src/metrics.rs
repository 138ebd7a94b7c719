//! Prometheus metrics: the recorder, the names of every series, and the series rendered at
//! scrape time.
//!
//! Process-wide counters and histograms are recorded where things happen (through the
//! `metrics` facade, which costs an atomic add when a recorder is installed and nothing
//! otherwise). Those of a queue or a consumer group are owned by it ([`QueueSeries`],
//! [`GroupSeries`]: atomics in the queue and the group) and go with it, since the recorder
//! keeps every series until the process ends. Gauges that describe state (backlog, in
//! flight, stored bytes) are computed from the broker at scrape time. Both are rendered
//! through [`ScrapeSeries`], so no hot path maintains a gauge and a series ends with what it
//! describes.
//!
//! All series are named `qit_...`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages appended to a queue (label `queue`).
pub const PUBLISHED: &str = "qit_messages_published_total";
/// Leases handed out (labels `queue`, `group`).
pub const DELIVERED: &str = "qit_messages_delivered_total";
/// Deliveries beyond a message's first (labels `queue`, `group`).
pub const REDELIVERED: &str = "qit_messages_redelivered_total";
/// Acknowledgements (labels `queue`, `group`).
pub const ACKED: &str = "qit_messages_acked_total";
/// Negative acknowledgements (labels `queue`, `group`).
pub const NACKED: &str = "qit_messages_nacked_total";
/// Leases that ran past their visibility timeout (labels `queue`, `group`).
pub const EXPIRED: &str = "qit_leases_expired_total";
/// Messages moved to the dead-letter queue (labels `queue`, `group`).
pub const DEAD_LETTERED: &str = "qit_messages_dead_lettered_total";
/// Messages a group skipped because retention deleted them first (labels `queue`, `group`).
pub const RETENTION_SKIPPED: &str = "qit_messages_skipped_by_retention_total";
/// Publish latency from request to append (durable under `fsync = always`), seconds
/// (label `queue`).
pub const PUBLISH_LATENCY: &str = "qit_publish_latency_seconds";
/// Time from publish to first delivery to a consumer, seconds (labels `queue`, `group`).
pub const END_TO_END_LATENCY: &str = "qit_end_to_end_latency_seconds";
/// Age of a group's oldest message not yet acked or dead-lettered, seconds (gauge; labels
/// `queue`, `group`; 0 when nothing is pending).
pub const OLDEST_PENDING_AGE: &str = "qit_oldest_unacked_age_seconds";
/// Duration of one fsync of a segment or journal, seconds.
pub const FSYNC_LATENCY: &str = "qit_fsync_latency_seconds";
/// Messages not yet done for a group (gauge; labels `queue`, `group`).
pub const BACKLOG: &str = "qit_backlog_messages";
/// Leases held now (gauge; labels `queue`, `group`).
pub const IN_FLIGHT: &str = "qit_in_flight_messages";
/// Bytes of `.log` segment files (gauge; labels `queue`, `partition`).
pub const STORED_BYTES: &str = "qit_stored_bytes";
/// Number of segments (gauge; labels `queue`, `partition`).
pub const SEGMENTS: &str = "qit_segments";
/// Number of queues (gauge).
pub const QUEUES: &str = "qit_queues";
/// Long-lived files (active segments, group journals) the file cache holds open (gauge).
pub const OPEN_FILES: &str = "qit_open_files";
/// Sealed segment files (`.log`, `.index`, `.timeindex`) the map cache holds mapped (gauge).
pub const MAPPED_FILES: &str = "qit_mapped_files";
/// Open client connections (gauge; label `protocol`: `http` or `grpc`).
pub const CONNECTIONS: &str = "qit_connections_open";
/// Open gRPC consumer and subscriber streams (gauge; label `kind`).
pub const GRPC_STREAMS: &str = "qit_grpc_streams_open";
/// Open long-poll waiters (gauge).
pub const LONG_POLL_WAITERS: &str = "qit_long_poll_waiters";
/// Segments deleted by retention (label `queue`).
pub const RETENTION_SEGMENTS_DELETED: &str = "qit_retention_segments_deleted_total";
/// Bytes reclaimed by retention and compaction (labels `queue`, `task`).
pub const BYTES_RECLAIMED: &str = "qit_bytes_reclaimed_total";
/// Records removed by compaction (label `queue`).
pub const COMPACTION_RECORDS_REMOVED: &str = "qit_compaction_records_removed_total";
/// Unix time of a background task's last run, seconds (gauge; label `task`).
pub const BACKGROUND_LAST_RUN: &str = "qit_background_last_run_timestamp_seconds";

/// Sets the [`OPEN_FILES`] gauge.
pub fn set_open_files(open: usize) {
    metrics::gauge!(OPEN_FILES).set(open as f64);
}

/// Sets the [`MAPPED_FILES`] gauge.
pub fn set_mapped_files(mapped: usize) {
    metrics::gauge!(MAPPED_FILES).set(mapped as f64);
}

/// Latency buckets in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// Errors of installing the metrics recorder.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter rejected its configuration.
    #[error("metrics exporter: {0}")]
    Build(#[from] BuildError),
    /// Another recorder than qit's is installed in this process.
    #[error("a different metrics recorder is already installed")]
    ForeignRecorder,
}

/// Installs the global Prometheus recorder once (later calls return the same handle), so
/// several servers in one test process share it.
pub fn install() -> Result<&'static PrometheusHandle, MetricsError> {
    let _guard = INSTALL_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::ForeignRecorder)?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// What the state gauges show of one queue. Plain data the broker layer fills in, so this
/// module, below the broker, never imports the broker's types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueGauges {
    /// Queue name.
    pub name: String,
    /// Per partition.
    pub partitions: Vec<PartitionGauges>,
    /// Per group.
    pub groups: Vec<GroupGauges>,
}

/// What the state gauges show of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionGauges {
    /// Partition number.
    pub partition: u32,
    /// Bytes of `.log` files.
    pub bytes: u64,
    /// Number of segments.
    pub segments: u32,
}

/// What the state gauges show of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupGauges {
    /// Group name.
    pub name: String,
    /// Messages not yet done.
    pub backlog: u64,
    /// Leases held now.
    pub in_flight: u64,
}

/// How many of the busiest queues get per-queue gauges by default.
pub const DEFAULT_GAUGED_QUEUES: usize = 100;

/// Series rendered at scrape time from what they describe: gauges of current state, and the
/// counters and histograms that queues and consumer groups own ([`QueueSeries`],
/// [`GroupSeries`]). A series is shown only while what it describes exists, so the series
/// of a deleted queue or of a Raft group that left this node end with it. (A gauge kept in
/// the recorder would go on showing its last value until the process ends: a deleted
/// queue's backlog, a former leader's `is_leader` 1.)
#[derive(Debug, Default)]
pub struct ScrapeSeries {
    /// Each metric's type and samples, in the order the metrics were first set: a family's
    /// samples stay together, under one `# TYPE` line, as the text format requires.
    families: Vec<Family>,
    /// The queues whose series are shown (all when absent; see [`Self::only_queues`]).
    shown: Option<QueueFilter>,
}

/// Which queues' series a scrape shows.
struct QueueFilter(Box<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for QueueFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueFilter")
    }
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    kind: &'static str,
    lines: String,
}

impl ScrapeSeries {
    /// Series that show only the queues `shown` accepts: a sample labelled with another
    /// `queue` is left out (with auth on, a user's scrape names only the queues the user
    /// may see). Samples without a `queue` label are all shown.
    pub fn only_queues(shown: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            families: Vec::new(),
            shown: Some(QueueFilter(Box::new(shown))),
        }
    }

    /// Whether a sample with `labels` is shown.
    fn shows(&self, labels: &[(&str, &str)]) -> bool {
        let Some(QueueFilter(shown)) = &self.shown else {
            return true;
        };
        labels
            .iter()
            .all(|&(key, value)| key != "queue" || shown(value))
    }

    /// Adds one sample of gauge `name` with `labels`.
    pub fn set(&mut self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        if !self.shows(labels) {
            return;
        }
        let lines = self.family(name, "gauge");
        push_sample(lines, name, "", labels, None, value);
    }

    /// Adds one sample of counter `name` with `labels`.
    pub fn counter(&mut self, name: &'static str, labels: &[(&str, &str)], value: u64) {
        if !self.shows(labels) {
            return;
        }
        let lines = self.family(name, "counter");
        push_sample(lines, name, "", labels, None, value);
    }

    /// Adds the buckets, sum and count of histogram `name` with `labels`.
    pub fn histogram(&mut self, name: &'static str, labels: &[(&str, &str)], h: &OwnedHistogram) {
        if !self.shows(labels) {
            return;
        }
        let lines = self.family(name, "histogram");
        let counts = h.bucket_counts();
        let mut below = 0;
        for (bound, samples) in LATENCY_BUCKETS.iter().zip(counts) {
            below += samples;
            let le = bound.to_string();
            push_sample(lines, name, "_bucket", labels, Some(&le), below);
        }
        // From the same reads as the buckets: `+Inf` is never below the last bound's.
        let count: u64 = counts.iter().sum();
        push_sample(lines, name, "_bucket", labels, Some("+Inf"), count);
        push_sample(lines, name, "_sum", labels, None, h.sum_seconds());
        push_sample(lines, name, "_count", labels, None, count);
    }

    /// The lines of family `name`, started (of type `kind`) when new.
    fn family(&mut self, name: &'static str, kind: &'static str) -> &mut String {
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                let lines = String::new();
                self.families.push(Family { name, kind, lines });
                self.families.len() - 1
            }
        };
        &mut self.families[index].lines
    }

    /// The samples in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for family in &self.families {
            text.push_str("# TYPE ");
            text.push_str(family.name);
            text.push(' ');
            text.push_str(family.kind);
            text.push('\n');
            text.push_str(&family.lines);
        }
        text
    }
}

/// Appends one sample line: `{name}{suffix}{labels,le} value`.
fn push_sample(
    lines: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: impl std::fmt::Display,
) {
    lines.push_str(name);
    lines.push_str(suffix);
    let le = le.map(|le| ("le", le));
    let mut all = labels.iter().copied().chain(le).peekable();
    if all.peek().is_some() {
        lines.push('{');
        for (i, (key, value)) in all.enumerate() {
            if i > 0 {
                lines.push(',');
            }
            lines.push_str(key);
            lines.push_str("=\"");
            push_escaped(lines, value);
            lines.push('"');
        }
        lines.push('}');
    }
    lines.push(' ');
    lines.push_str(&value.to_string());
    lines.push('\n');
}

/// A counter owned by what it counts (a queue or one of its consumer groups) and rendered
/// from it at scrape time, so it goes with its owner. The recorder keeps every series it
/// was given until the process ends: with per-queue series there, a broker whose clients
/// make and delete queues all day (reply queues, say) grew by about a kilobyte per queue.
#[derive(Debug, Default)]
pub struct OwnedCounter(AtomicU64);

impl OwnedCounter {
    /// Adds `n`.
    pub fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram owned by what it measures (see [`OwnedCounter`]), in the buckets
/// of the recorder's histograms ([`LATENCY_BUCKETS`]). Its buckets are allocated at the
/// first sample: an idle queue or group holds only an empty cell (16 bytes, not 150).
#[derive(Debug, Default)]
pub struct OwnedHistogram {
    samples: OnceLock<Box<Samples>>,
}

#[derive(Debug, Default)]
struct Samples {
    /// Samples per bucket, not cumulative; the last one holds those above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the samples in nanoseconds.
    sum_nanos: AtomicU64,
}

impl OwnedHistogram {
    /// Records one sample in seconds (a negative or NaN one counts as 0).
    pub fn record(&self, seconds: f64) {
        let samples = self.samples.get_or_init(Box::default);
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        samples.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // `as` saturates: a negative or NaN sample adds nothing.
        let nanos = (seconds * 1e9) as u64;
        samples.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Samples per bucket (not cumulative, the last above every bound), all 0 before the
    /// first sample.
    fn bucket_counts(&self) -> [u64; LATENCY_BUCKETS.len() + 1] {
        let mut counts = [0; LATENCY_BUCKETS.len() + 1];
        if let Some(samples) = self.samples.get() {
            for (count, bucket) in counts.iter_mut().zip(&samples.buckets) {
                *count = bucket.load(Ordering::Relaxed);
            }
        }
        counts
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.bucket_counts().iter().sum()
    }

    /// Sum of the samples in seconds.
    pub fn sum_seconds(&self) -> f64 {
        let nanos = self
            .samples
            .get()
            .map_or(0, |s| s.sum_nanos.load(Ordering::Relaxed));
        nanos as f64 / 1e9
    }
}

/// The counters and histograms of one queue, owned by it (see [`OwnedCounter`]).
#[derive(Debug, Default)]
pub struct QueueSeries {
    /// Messages appended ([`PUBLISHED`]).
    pub published: OwnedCounter,
    /// Seconds from a publish's arrival to its answer, on the node that answered it
    /// ([`PUBLISH_LATENCY`]).
    pub publish_latency: OwnedHistogram,
    /// Segments deleted by retention ([`RETENTION_SEGMENTS_DELETED`]).
    pub retention_segments_deleted: OwnedCounter,
    /// Bytes freed by retention ([`BYTES_RECLAIMED`], `task="retention"`).
    pub retention_bytes_reclaimed: OwnedCounter,
    /// Records removed by compaction ([`COMPACTION_RECORDS_REMOVED`]).
    pub compaction_records_removed: OwnedCounter,
    /// Bytes freed by compaction ([`BYTES_RECLAIMED`], `task="compaction"`).
    pub compaction_bytes_reclaimed: OwnedCounter,
}

impl QueueSeries {
    /// Adds the series of queue `queue` to `out`: each counter once it counted something,
    /// each histogram once it has a sample (as the recorder shows a series from its first
    /// event).
    pub fn render(&self, queue: &str, out: &mut ScrapeSeries) {
        let labels = [("queue", queue)];
        counter_if_any(out, PUBLISHED, &labels, &self.published);
        histogram_if_any(out, PUBLISH_LATENCY, &labels, &self.publish_latency);
        let deleted = &self.retention_segments_deleted;
        counter_if_any(out, RETENTION_SEGMENTS_DELETED, &labels, deleted);
        let removed = &self.compaction_records_removed;
        counter_if_any(out, COMPACTION_RECORDS_REMOVED, &labels, removed);
        for (task, bytes) in [
            ("retention", &self.retention_bytes_reclaimed),
            ("compaction", &self.compaction_bytes_reclaimed),
        ] {
            let labels = [("queue", queue), ("task", task)];
            counter_if_any(out, BYTES_RECLAIMED, &labels, bytes);
        }
    }
}

/// The counters and histograms of one consumer group, owned by it (see [`OwnedCounter`]).
#[derive(Debug, Default)]
pub struct GroupSeries {
    /// Leases handed out ([`DELIVERED`]).
    pub delivered: OwnedCounter,
    /// Deliveries beyond a message's first ([`REDELIVERED`]).
    pub redelivered: OwnedCounter,
    /// Acknowledgements ([`ACKED`]).
    pub acked: OwnedCounter,
    /// Negative acknowledgements ([`NACKED`]).
    pub nacked: OwnedCounter,
    /// Leases that ran past their visibility timeout ([`EXPIRED`]).
    pub expired: OwnedCounter,
    /// Messages moved to the dead-letter queue ([`DEAD_LETTERED`]).
    pub dead_lettered: OwnedCounter,
    /// Messages skipped because retention deleted them first ([`RETENTION_SKIPPED`]).
    pub retention_skipped: OwnedCounter,
    /// Seconds from publish to first delivery ([`END_TO_END_LATENCY`]).
    pub end_to_end_latency: OwnedHistogram,
}

impl GroupSeries {
    /// Adds the series of consumer group `group` of queue `queue` to `out` (see
    /// [`QueueSeries::render`]).
    pub fn render(&self, queue: &str, group: &str, out: &mut ScrapeSeries) {
        let labels = [("queue", queue), ("group", group)];
        for (name, counter) in [
            (DELIVERED, &self.delivered),
            (REDELIVERED, &self.redelivered),
            (ACKED, &self.acked),
            (NACKED, &self.nacked),
            (EXPIRED, &self.expired),
            (DEAD_LETTERED, &self.dead_lettered),
            (RETENTION_SKIPPED, &self.retention_skipped),
        ] {
            counter_if_any(out, name, &labels, counter);
        }
        histogram_if_any(out, END_TO_END_LATENCY, &labels, &self.end_to_end_latency);
    }
}

fn counter_if_any(
    out: &mut ScrapeSeries,
    name: &'static str,
    labels: &[(&str, &str)],
    counter: &OwnedCounter,
) {
    let value = counter.get();
    if value > 0 {
        out.counter(name, labels, value);
    }
}

fn histogram_if_any(
    out: &mut ScrapeSeries,
    name: &'static str,
    labels: &[(&str, &str)],
    histogram: &OwnedHistogram,
) {
    if histogram.count() > 0 {
        out.histogram(name, labels, histogram);
    }
}

/// A label value as the text format writes it (`\`, `"` and newlines escaped).
fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Adds the number of queues (`total`) and the state gauges of the given queues' groups
/// and partitions (the server passes the busiest few, so that a scrape stays cheap with
/// thousands of queues).
pub fn queue_gauges(state: &mut ScrapeSeries, total: usize, queues: &[QueueGauges]) {
    state.set(QUEUES, &[], total as f64);
    for queue in queues {
        for partition in &queue.partitions {
            let number = partition.partition.to_string();
            let labels = [
                ("queue", queue.name.as_str()),
                ("partition", number.as_str()),
            ];
            state.set(STORED_BYTES, &labels, partition.bytes as f64);
            state.set(SEGMENTS, &labels, f64::from(partition.segments));
        }
        for group in &queue.groups {
            let labels = [
                ("queue", queue.name.as_str()),
                ("group", group.name.as_str()),
            ];
            state.set(BACKLOG, &labels, group.backlog as f64);
            state.set(IN_FLIGHT, &labels, group.in_flight as f64);
        }
    }
}

/// Adds the oldest-unacked-age gauges from `(queue, group, age ms)`.
pub fn pending_ages(state: &mut ScrapeSeries, ages: &[(String, String, i64)]) {
    for (queue, group, age_ms) in ages {
        let labels = [("queue", queue.as_str()), ("group", group.as_str())];
        state.set(OLDEST_PENDING_AGE, &labels, *age_ms as f64 / 1000.0);
    }
}

/// Folds recorded histogram samples into their buckets. Samples are kept raw until then, so
/// the server calls this every few seconds, keeping their memory bounded between scrapes.
pub fn upkeep() {
    if let Some(handle) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// Renders the recorded series (the process-wide ones: connections, streams, files,
/// fsyncs, cluster events) and then `state` (only `state` when no recorder is installed).
/// No recorded series carries a queue or consumer group: those belong to their queue and
/// group ([`QueueSeries`], [`GroupSeries`]) and go with them, so nothing of a deleted queue
/// is left to filter out here.
pub fn render(state: &ScrapeSeries) -> String {
    let mut text = HANDLE
        .get()
        .map(|handle| {
            handle.run_upkeep();
            handle.render()
        })
        .unwrap_or_default();
    text.push_str(&state.render());
    text
}

/// Records one latency sample in seconds.
pub fn observe_seconds(name: &'static str, seconds: f64) {
    metrics::histogram!(name).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_and_counters_render_with_qit_names() {
        install().unwrap();
        let info = QueueGauges {
            name: "metrics-test".into(),
            partitions: vec![PartitionGauges {
                partition: 0,
                segments: 1,
                bytes: 1234,
            }],
            groups: vec![GroupGauges {
                name: "default".into(),
                backlog: 5,
                in_flight: 2,
            }],
        };
        let mut state = ScrapeSeries::default();
        queue_gauges(&mut state, 1, &[info]);
        let queue = QueueSeries::default();
        queue.published.increment(7);
        queue.render("metrics-test", &mut state);
        let group = GroupSeries::default();
        group.acked.increment(2);
        group.render("metrics-test", "default", &mut state);
        observe_seconds(FSYNC_LATENCY, 0.002);
        let text = render(&state);
        assert!(
            text.contains(r#"qit_messages_acked_total{queue="metrics-test",group="default"} 2"#)
        );
        assert!(text.contains(r#"qit_backlog_messages{queue="metrics-test",group="default"} 5"#));
        assert!(text.contains(r#"qit_stored_bytes{queue="metrics-test",partition="0"} 1234"#));
        assert!(text.contains(r#"qit_messages_published_total{queue="metrics-test"} 7"#));
        assert!(text.contains("# TYPE qit_messages_published_total counter\n"));
        assert!(text.contains("qit_fsync_latency_seconds_bucket"));
    }

    /// An owned histogram renders as the recorder renders its histograms: the same
    /// cumulative buckets, `+Inf`, sum and count, so a dashboard cannot tell them apart.
    #[test]
    fn an_owned_histogram_renders_as_the_recorder_does() {
        let handle = install().unwrap();
        let name = "qit_test_owned_histogram_seconds";
        let owned = OwnedHistogram::default();
        for seconds in [0.000_01, 0.000_05, 0.5, 0.25, 2.0, 2.0, 60.0] {
            owned.record(seconds);
            metrics::histogram!(name, "queue" => "recorded").record(seconds);
        }
        let mut state = ScrapeSeries::default();
        state.histogram(name, &[("queue", "recorded")], &owned);
        let mine = state.render();
        handle.run_upkeep();
        let theirs = handle.render();
        let theirs: Vec<&str> = theirs.lines().filter(|l| l.contains(name)).collect();
        assert_eq!(mine.lines().collect::<Vec<_>>(), theirs, "{mine}");
        assert!(
            mine.contains(r#"{queue="recorded",le="0.00005"} 2"#),
            "{mine}"
        );
        assert!(mine.contains(r#"{queue="recorded",le="10"} 6"#), "{mine}");
        assert!(mine.contains(r#"_count{queue="recorded"} 7"#), "{mine}");
        // An idle queue's or group's histogram is an empty cell until its first sample.
        let empty = OwnedHistogram::default();
        assert!(std::mem::size_of::<OwnedHistogram>() <= 16);
        assert_eq!((empty.count(), empty.sum_seconds()), (0, 0.0));
        empty.record(f64::NAN);
        empty.record(-1.0);
        assert_eq!((empty.count(), empty.sum_seconds()), (2, 0.0));
    }

    /// Each family is one block under one `# TYPE` line, even when its samples were set
    /// in between another's; label values are escaped; the next scrape shows only what it
    /// sets (a queue gone since shows no series).
    #[test]
    fn scrape_series_group_families_and_show_only_what_was_set() {
        let mut state = ScrapeSeries::default();
        state.set(BACKLOG, &[("queue", "a"), ("group", "g")], 3.0);
        state.set(IN_FLIGHT, &[("queue", "a"), ("group", "g")], 1.0);
        state.set(BACKLOG, &[("queue", "b\"\\"), ("group", "g")], 0.5);
        state.set(QUEUES, &[], 2.0);
        let text = state.render();
        let expected = [
            "# TYPE qit_backlog_messages gauge",
            r#"qit_backlog_messages{queue="a",group="g"} 3"#,
            r#"qit_backlog_messages{queue="b\"\\",group="g"} 0.5"#,
            "# TYPE qit_in_flight_messages gauge",
            r#"qit_in_flight_messages{queue="a",group="g"} 1"#,
            "# TYPE qit_queues gauge",
            "qit_queues 2",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        let mut later = ScrapeSeries::default();
        queue_gauges(&mut later, 0, &[]);
        assert_eq!(later.render(), "# TYPE qit_queues gauge\nqit_queues 0\n");
        let mut shown = ScrapeSeries::only_queues(|queue| queue == "a");
        shown.set(BACKLOG, &[("queue", "b"), ("group", "g")], 1.0);
        shown.set(BACKLOG, &[("queue", "a"), ("group", "g")], 3.0);
        shown.set(IN_FLIGHT, &[("queue", "b"), ("group", "g")], 1.0);
        shown.set(QUEUES, &[], 2.0);
        let expected = [
            "# TYPE qit_backlog_messages gauge",
            r#"qit_backlog_messages{queue="a",group="g"} 3"#,
            "# TYPE qit_queues gauge",
            "qit_queues 2",
        ];
        assert_eq!(
            shown.render().lines().collect::<Vec<_>>(),
            expected,
            "another queue's series and families are left out"
        );
    }
}
