//! Background maintenance of partitions: retention (age, size, "all groups acked") and key
//! compaction. Planning is pure ([`retention::plan`], [`compaction::keeps`]); the runner
//! applies it to every queue at a fixed interval, off the async threads, with bounded I/O.

pub mod compaction;
pub mod retention;

use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::clock::Ticks;

use crate::broker::Broker;
use crate::broker::queue::Queue;
use crate::metrics;

/// Settings of the background tasks.
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// How often retention and compaction run.
    pub interval: Duration,
    /// How long compaction keeps tombstones.
    pub delete_retention: Duration,
    /// Most bytes per second compaction rewrites.
    pub bytes_per_sec: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            delete_retention: Duration::from_secs(24 * 3600),
            bytes_per_sec: 64 * 1024 * 1024,
        }
    }
}

/// What one pass over one queue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Segments deleted by retention.
    pub segments_deleted: usize,
    /// Bytes deleted by retention.
    pub retention_bytes: u64,
    /// Records removed by compaction.
    pub records_compacted: u64,
    /// Bytes reclaimed by compaction.
    pub compaction_bytes: u64,
}

/// Applies retention to every partition of `queue`.
pub fn retain(queue: &Queue, now: i64) -> Result<PassStats, crate::log::LogError> {
    let mut stats = PassStats::default();
    for (p, log) in queue.partitions.iter().enumerate() {
        let floor = queue.min_group_floor(p as u32);
        let Some(plan) = retention::plan(&log.segments(), &queue.settings.retention, now, floor)
        else {
            continue;
        };
        let dropped = log.drop_segments_before(plan.drop_before)?;
        if dropped > 0 {
            tracing::info!(queue = %queue.name, partition = p, segments = dropped, bytes = plan.bytes, reason = ?plan.reason, "retention deleted segments");
            stats.segments_deleted += dropped;
            stats.retention_bytes += plan.bytes;
        }
    }
    if stats.segments_deleted > 0 {
        queue.skip_groups_to_start();
        let series = &queue.series;
        let deleted = stats.segments_deleted as u64;
        series.retention_segments_deleted.increment(deleted);
        series
            .retention_bytes_reclaimed
            .increment(stats.retention_bytes);
    }
    Ok(stats)
}

/// Compacts every partition of `queue` (when its settings ask for it).
pub fn compact(
    queue: &Queue,
    now: i64,
    config: &MaintenanceConfig,
) -> Result<PassStats, crate::log::LogError> {
    let mut stats = PassStats::default();
    if !queue.settings.compaction {
        return Ok(stats);
    }
    let mut pace = |bytes: u64| {
        let secs = bytes as f64 / config.bytes_per_sec.max(1) as f64;
        std::thread::sleep(Duration::from_secs_f64(secs.min(5.0)));
    };
    for (p, log) in queue.partitions.iter().enumerate() {
        let done = compaction::compact(log, now, config.delete_retention, &mut pace)?;
        if done.records_removed > 0 {
            tracing::info!(queue = %queue.name, partition = p, records = done.records_removed, bytes = done.bytes_reclaimed, "compaction removed superseded records");
        }
        stats.records_compacted += done.records_removed;
        stats.compaction_bytes += done.bytes_reclaimed;
    }
    let series = &queue.series;
    series
        .compaction_records_removed
        .increment(stats.records_compacted);
    series
        .compaction_bytes_reclaimed
        .increment(stats.compaction_bytes);
    Ok(stats)
}

/// Runs retention and compaction over every queue now (blocking I/O: call off the async
/// threads).
pub fn run_once(broker: &Broker, config: &MaintenanceConfig) -> PassStats {
    run_once_at(broker, config, broker.clock().now_ms())
}

/// [`run_once`] as if the time were `now` (ms), for tests and tools.
pub fn run_once_at(broker: &Broker, config: &MaintenanceConfig, now: i64) -> PassStats {
    let mut total = PassStats::default();
    for queue in broker.queue_handles() {
        if broker.is_shutting_down() {
            break; // the rest waits for the next start: shutdown joins this pass
        }
        match retain(&queue, now) {
            Ok(s) => {
                total.segments_deleted += s.segments_deleted;
                total.retention_bytes += s.retention_bytes;
            }
            Err(error) => tracing::error!(queue = %queue.name, %error, "retention failed"),
        }
        match compact(&queue, now, config) {
            Ok(s) => {
                total.records_compacted += s.records_compacted;
                total.compaction_bytes += s.compaction_bytes;
            }
            Err(error) => tracing::error!(queue = %queue.name, %error, "compaction failed"),
        }
    }
    let unix = now as f64 / 1000.0;
    ::metrics::gauge!(metrics::BACKGROUND_LAST_RUN, "task" => "retention").set(unix);
    ::metrics::gauge!(metrics::BACKGROUND_LAST_RUN, "task" => "compaction").set(unix);
    total
}

/// Runs [`run_once`] every `config.interval` until `shutdown`.
pub async fn run(broker: Weak<Broker>, config: MaintenanceConfig, shutdown: CancellationToken) {
    let mut ticks = Ticks::after(config.interval, shutdown);
    while ticks.next().await {
        let Some(strong) = broker.upgrade() else {
            return;
        };
        let config = config.clone();
        let started = Instant::now();
        let pass = tokio::task::spawn_blocking(move || run_once(&strong, &config)).await;
        match pass {
            Ok(stats) if stats != PassStats::default() => {
                tracing::debug!(?stats, elapsed = ?started.elapsed(), "maintenance pass");
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "maintenance pass panicked"),
        }
    }
}
