//! `qit bench --queues N`: many queues on one node. Creates N queues (each with its
//! dead-letter queue) over HTTP, puts one message through each (publish, receive, ack),
//! lets the server go idle, and reports the create rate, publish latencies to cold queues,
//! and the server process's threads, open descriptors, resident memory and idle CPU, read
//! from `/proc/<pid>` (the server must run on this machine: `--server-pid`, or found as the
//! process running `qit serve`). Restart time is measured by `tools/many-queues.sh`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::bench::BenchError;

/// What to run.
#[derive(Debug, Clone)]
pub struct ManyQueuesOptions {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8080`.
    pub http_url: String,
    /// Queues to create.
    pub queues: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Queue name prefix (`{prefix}-{i}`).
    pub prefix: String,
    /// The server's process id (found under `/proc` when `None`).
    pub server_pid: Option<u32>,
    /// Seconds to wait after the traffic before sampling the idle server.
    pub idle_wait: Duration,
    /// Seconds over which idle CPU is measured.
    pub cpu_window: Duration,
    /// Delete the queues at the end (and report the delete rate).
    pub cleanup: bool,
}

/// What a process looks like in `/proc`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessSample {
    /// OS threads.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Resident memory in MiB.
    pub rss_mib: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ManyQueuesReport {
    /// Queues created (each with a dead-letter queue).
    pub queues: usize,
    /// Queue creations per second.
    pub create_per_sec: f64,
    /// Publishes to queues touched last long ago, `concurrency` at a time while the others
    /// are created or published to: p50 / p99 / max in milliseconds.
    pub cold_publish_ms: [f64; 3],
    /// Publishes one at a time to queues of the idle server whose files the cache closed
    /// (up to [`COLD_PROBES`] queues spread over the range): p50 / p99 / max in milliseconds.
    pub idle_cold_publish_ms: [f64; 3],
    /// Messages put through (publish, receive, ack) per second.
    pub roundtrips_per_sec: f64,
    /// The server process after the traffic, once idle.
    pub idle: ProcessSample,
    /// CPU the idle server used, in percent of one core.
    pub idle_cpu_percent: f64,
    /// Queue deletions per second (when `cleanup`).
    pub delete_per_sec: Option<f64>,
}

impl ManyQueuesReport {
    /// A human-readable summary.
    pub fn human(&self) -> String {
        let deletes = self
            .delete_per_sec
            .map_or(String::new(), |r| format!("\ndeleted:   {r:.0} queues/s"));
        format!(
            "queues:    {} (+ {} dead-letter queues)\ncreated:   {:.0} queues/s\n\
             cold publish: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (all queues, under load)\n\
             idle cold publish: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (one at a time, files closed)\n\
             through:   {:.0} messages/s (publish, receive, ack)\n\
             idle:      {} threads, {} open descriptors, {:.1} MiB resident, {:.2}% of a core{deletes}",
            self.queues,
            self.queues,
            self.create_per_sec,
            self.cold_publish_ms[0],
            self.cold_publish_ms[1],
            self.cold_publish_ms[2],
            self.idle_cold_publish_ms[0],
            self.idle_cold_publish_ms[1],
            self.idle_cold_publish_ms[2],
            self.roundtrips_per_sec,
            self.idle.threads,
            self.idle.fds,
            self.idle.rss_mib,
            self.idle_cpu_percent,
        )
    }
}

/// Reads threads, descriptors and resident memory of process `pid` from `/proc`.
pub fn sample_process(pid: u32) -> std::io::Result<ProcessSample> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcessSample {
        threads: field("Threads:"),
        fds: std::fs::read_dir(proc.join("fd"))?.count() as u64,
        rss_mib: field("VmRSS:") as f64 / 1024.0,
    })
}

/// CPU time (user + system) of process `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(tick(11) + tick(12))
}

/// The process running `qit serve` on this machine, if exactly one does.
pub fn find_server_pid() -> Option<u32> {
    let found: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_qit_server(Path::new(&format!("/proc/{pid}/cmdline"))))
        .collect();
    match found.as_slice() {
        [pid] => Some(*pid),
        _ => None,
    }
}

fn is_qit_server(cmdline: &Path) -> bool {
    let Ok(raw) = std::fs::read(cmdline) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let program_is_qit = args
        .first()
        .is_some_and(|p| p.ends_with(b"/qit") || *p == b"qit");
    program_is_qit && args.iter().any(|a| *a == b"serve")
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, BenchError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(BenchError::Status {
        status: status.as_u16(),
        body: response.text().await.unwrap_or_default(),
    })
}

/// Runs `op(i)` for every `i < n` with `concurrency` in flight; returns each duration.
async fn for_each<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<Vec<Duration>, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (next, op) = (Arc::clone(&next), Arc::clone(&op));
        workers.spawn(async move {
            let mut took = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, BenchError>(took);
                }
                let started = Instant::now();
                op(i).await?;
                took.push(started.elapsed());
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(done) = workers.join_next().await {
        all.extend(done??);
    }
    Ok(all)
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

/// Queues the idle server gets one publish each, one at a time.
pub const COLD_PROBES: usize = 200;

/// Runs the many-queues benchmark.
pub async fn run(opts: ManyQueuesOptions) -> Result<ManyQueuesReport, BenchError> {
    if opts.queues == 0 {
        return Err(BenchError::Invalid("--queues must be positive".into()));
    }
    let pid = opts.server_pid.or_else(find_server_pid).ok_or_else(|| {
        BenchError::Invalid("no single local `qit serve` process found: pass --server-pid".into())
    })?;
    let http = reqwest::Client::new();
    let base = opts.http_url.clone();
    let name = {
        let prefix = opts.prefix.clone();
        move |i: usize| format!("{prefix}-{i}")
    };

    let started = Instant::now();
    let (client, url, queue) = (http.clone(), base.clone(), name.clone());
    for_each(opts.queues, opts.concurrency, move |i| {
        let request = client
            .post(format!("{url}/queues/{}", queue(i)))
            .json(&serde_json::json!({"max_deliveries": 5}));
        async move { check(request.send().await?).await.map(drop) }
    })
    .await?;
    let create_per_sec = rate(opts.queues, started.elapsed());

    // Publish in creation order: by now the first queues are the longest untouched.
    let (client, url, queue) = (http.clone(), base.clone(), name.clone());
    let started = Instant::now();
    let publishes = for_each(opts.queues, opts.concurrency, move |i| {
        let request = client
            .post(format!("{url}/queues/{}/messages", queue(i)))
            .body(format!("{{\"n\":{i}}}"));
        async move { check(request.send().await?).await.map(drop) }
    })
    .await?;
    let (client, url, queue) = (http.clone(), base.clone(), name.clone());
    for_each(opts.queues, opts.concurrency, move |i| {
        let (client, url, queue) = (client.clone(), url.clone(), queue(i));
        async move {
            let received: serde_json::Value = check(
                client
                    .get(format!("{url}/queues/{queue}/messages"))
                    .send()
                    .await?,
            )
            .await?
            .json()
            .await?;
            let id = received["messages"][0]["id"]
                .as_str()
                .unwrap_or("0-0")
                .to_string();
            check(
                client
                    .delete(format!("{url}/queues/{queue}/messages/{id}"))
                    .send()
                    .await?,
            )
            .await
            .map(drop)
        }
    })
    .await?;
    let roundtrips_per_sec = rate(opts.queues, started.elapsed());

    tokio::time::sleep(opts.idle_wait).await;
    let idle = sample_process(pid).map_err(|e| BenchError::Invalid(format!("/proc/{pid}: {e}")))?;
    let before = cpu_ticks(pid).map_err(|e| BenchError::Invalid(format!("/proc/{pid}: {e}")))?;
    tokio::time::sleep(opts.cpu_window).await;
    let after = cpu_ticks(pid).map_err(|e| BenchError::Invalid(format!("/proc/{pid}: {e}")))?;
    // Linux reports CPU time in ticks of 1/100 s (USER_HZ).
    let idle_cpu_percent =
        (after.saturating_sub(before)) as f64 / opts.cpu_window.as_secs_f64().max(1e-9);

    // By now the idle server closed its files: each of these publishes reopens them.
    let probes = opts.queues.min(COLD_PROBES);
    let mut idle_publishes = Vec::with_capacity(probes);
    for k in 0..probes {
        let request = http
            .post(format!(
                "{base}/queues/{}/messages",
                name(k * opts.queues / probes)
            ))
            .body("{\"cold\":true}");
        let started = Instant::now();
        check(request.send().await?).await?;
        idle_publishes.push(started.elapsed());
    }

    let delete_per_sec = if opts.cleanup {
        let (client, url, queue) = (http.clone(), base.clone(), name.clone());
        let started = Instant::now();
        for_each(opts.queues, opts.concurrency, move |i| {
            let (first, second) = (
                client.delete(format!("{url}/queues/{}", queue(i))),
                client.delete(format!("{url}/queues/{}.dlq", queue(i))),
            );
            async move {
                check(first.send().await?).await?;
                check(second.send().await?).await.map(drop)
            }
        })
        .await?;
        Some(rate(opts.queues, started.elapsed()))
    } else {
        None
    };

    Ok(ManyQueuesReport {
        queues: opts.queues,
        create_per_sec,
        cold_publish_ms: percentiles(&publishes),
        idle_cold_publish_ms: percentiles(&idle_publishes),
        roundtrips_per_sec,
        idle,
        idle_cpu_percent,
        delete_per_sec,
    })
}

fn percentiles(took: &[Duration]) -> [f64; 3] {
    let Ok(mut histogram) = Histogram::<u64>::new(3) else {
        return [0.0; 3];
    };
    for t in took {
        let _ = histogram.record(t.as_micros() as u64);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    [
        ms(histogram.value_at_quantile(0.5)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let sample = sample_process(std::process::id()).unwrap();
        assert!(sample.threads >= 1);
        assert!(sample.fds >= 3);
        assert!(sample.rss_mib > 0.0);
        assert!(cpu_ticks(std::process::id()).is_ok());
    }
}
