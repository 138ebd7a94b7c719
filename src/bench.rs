//! `qit bench`: a load generator against a running server.
//!
//! Producers publish batches of fixed-size messages; consumers lease them (a gRPC
//! `ReceiveMessages` stream with credit, or HTTP long-polls) and acknowledge each one. Every
//! payload starts with its send time (microseconds since the Unix epoch, little-endian), so a
//! consumer measures end-to-end latency without any coordination. Producer and consumer
//! share the clock because they run on one machine (or should have synced clocks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::proto::broker_client::BrokerClient;
use crate::proto::{self, receive_request, receive_response};

/// Bytes at the start of each payload that hold its send time.
const STAMP_BYTES: usize = 8;
/// Give up when consumers make no progress for this long after producers finished.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Consumer group the bench consumes with.
const GROUP: &str = "bench";

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8080`.
    pub http_url: String,
    /// gRPC endpoint, e.g. `http://127.0.0.1:9090`.
    pub grpc_url: String,
    /// Publish and consume over HTTP instead of gRPC.
    pub use_http: bool,
    /// Queue to use; a fresh `bench-...` queue (deleted afterwards) when `None`.
    pub queue: Option<String>,
    /// Messages to publish in all (ignored when `duration` is set).
    pub messages: u64,
    /// Publish for this long instead of a fixed count.
    pub duration: Option<Duration>,
    /// Publish at most this many messages per second in all (`None`: as fast as possible),
    /// to measure latency at a given load.
    pub rate: Option<f64>,
    /// Payload size in bytes (at least 8: the send-time stamp).
    pub size: usize,
    /// Messages per publish request.
    pub batch: usize,
    /// Publish requests each producer keeps outstanding (unanswered) at once.
    pub window: usize,
    /// How gRPC producers publish: unary `SendMessage` calls or one `Publish` stream each.
    pub mode: PublishMode,
    /// Concurrent producers.
    pub producers: usize,
    /// Concurrent consumers.
    pub consumers: usize,
    /// Partitions of the bench queue.
    pub partitions: u32,
    /// Credit per gRPC consumer stream (most unacknowledged messages out at once).
    pub credit: u32,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// How a gRPC producer publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// One unary `SendMessage` call per request.
    #[default]
    Unary,
    /// One `Publish` stream per producer, requests pipelined on it.
    Stream,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `grpc` or `http`.
    pub transport: &'static str,
    /// How gRPC producers published.
    pub mode: PublishMode,
    /// Messages per publish request.
    pub batch: usize,
    /// Outstanding publish requests per producer.
    pub window: usize,
    /// Queue used.
    pub queue: String,
    /// Messages published.
    pub published: u64,
    /// Messages consumed and acknowledged (redeliveries included).
    pub consumed: u64,
    /// Payload size in bytes.
    pub size: usize,
    /// Publish throughput.
    pub publish_msgs_per_s: f64,
    /// Publish throughput in MB/s (10^6 bytes of payload).
    pub publish_mb_per_s: f64,
    /// Consume (lease + ack) throughput.
    pub consume_msgs_per_s: f64,
    /// Consume throughput in MB/s.
    pub consume_mb_per_s: f64,
    /// End-to-end latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest observed.
    pub max_ms: f64,
}

impl BenchReport {
    /// A summary for people.
    pub fn human(&self) -> String {
        format!(
            "queue {} over {}, {} B messages\n\
             publish: {} msgs in all, {:.0} msgs/s, {:.1} MB/s\n\
             consume: {} msgs in all, {:.0} msgs/s, {:.1} MB/s\n\
             end-to-end latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.queue,
            self.transport,
            self.size,
            self.published,
            self.publish_msgs_per_s,
            self.publish_mb_per_s,
            self.consumed,
            self.consume_msgs_per_s,
            self.consume_mb_per_s,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms
        )
    }
}

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Options out of range.
    #[error("invalid bench option: {0}")]
    Invalid(String),
    /// The HTTP side failed.
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered HTTP with an error status.
    #[error("server answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// Connecting over gRPC failed.
    #[error("gRPC connection failed: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// A gRPC call failed.
    #[error("gRPC call failed: {0}")]
    Rpc(#[from] tonic::Status),
    /// A worker task died.
    #[error("a bench task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The server answered a request on a `Publish` stream with an error, or broke the
    /// stream's promises (an unknown `seq`, an early end).
    #[error("publish stream: {0}")]
    Stream(String),
}

/// Counters shared by all workers.
struct Shared {
    opts: BenchOptions,
    queue: String,
    published: AtomicU64,
    consumed: AtomicU64,
    /// Messages the consumers must see before they stop (`u64::MAX` until known).
    target: AtomicU64,
    /// Set when consumers should stop regardless.
    stop: AtomicBool,
}

impl Shared {
    /// Counts one consumed message, unless the consumers have seen their target already:
    /// then false, and the message is left unacked for whoever consumes the queue next
    /// (a bench run on an existing queue takes exactly `--messages` from it).
    fn claim(&self) -> bool {
        let target = self.target.load(Ordering::Relaxed);
        self.consumed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < target).then_some(n + 1)
            })
            .is_ok()
    }

    fn consumers_done(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.consumed.load(Ordering::Relaxed) >= self.target.load(Ordering::Relaxed)
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    validate(&opts)?;
    let fresh = opts.queue.is_none();
    let queue = opts
        .queue
        .clone()
        .unwrap_or_else(|| format!("bench-{}-{}", std::process::id(), rand::random::<u32>()));
    let http = reqwest::Client::new();
    create_queue(&http, &opts, &queue).await?;
    let shared = Arc::new(Shared {
        target: AtomicU64::new(if opts.duration.is_some() {
            u64::MAX
        } else {
            opts.messages
        }),
        opts,
        queue,
        published: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let report = drive(&shared).await;
    if fresh {
        // The fresh queue and the dead-letter queue made with it. Best effort: a failed
        // cleanup must not hide the figures.
        for queue in [shared.queue.clone(), format!("{}.dlq", shared.queue)] {
            let url = format!("{}/queues/{queue}", shared.opts.http_url);
            let _ = http.delete(url).send().await;
        }
    }
    report
}

fn validate(opts: &BenchOptions) -> Result<(), BenchError> {
    let bad = |m: &str| Err(BenchError::Invalid(m.to_string()));
    if opts.size < STAMP_BYTES {
        return bad("--size must be at least 8 bytes (the send-time stamp)");
    }
    if opts.batch == 0 || opts.batch > 1000 {
        return bad("--batch must be 1..=1000");
    }
    if opts.window == 0 || opts.window > 10_000 {
        return bad("--window must be 1..=10000");
    }
    if opts.use_http && opts.mode == PublishMode::Stream {
        return bad("--mode stream publishes over gRPC; drop --http");
    }
    if opts.producers == 0 && opts.consumers == 0 {
        return bad("--producers and --consumers cannot both be 0");
    }
    if opts.producers == 0 && (opts.queue.is_none() || opts.duration.is_some()) {
        return bad("--producers 0 consumes --messages from an existing --queue");
    }
    if opts.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return bad("--rate must be a positive number of messages per second");
    }
    if opts.duration.is_none() && opts.messages == 0 {
        return bad("--messages must be at least 1");
    }
    Ok(())
}

async fn create_queue(
    http: &reqwest::Client,
    opts: &BenchOptions,
    queue: &str,
) -> Result<(), BenchError> {
    let url = format!("{}/queues/{}", opts.http_url, queue);
    let body = serde_json::json!({ "partitions": opts.partitions });
    let response = http.post(url).json(&body).send().await?;
    expect_success(response).await.map(|_| ())
}

/// Sends the request `make` builds, and again after a pause while the server answers 503
/// (a cluster between leaders answers `no_leader`), up to [`STREAM_RETRIES`] times; then
/// as [`expect_success`]. (A repeated ack is harmless; a repeated publish may be stored
/// twice, as after any lost answer.)
async fn send_http(
    make: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, BenchError> {
    let unavailable = |sent: &Result<reqwest::Response, reqwest::Error>| {
        sent.as_ref()
            .is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
    };
    let response = while_no_leader(|| make().send(), unavailable).await?;
    expect_success(response).await
}

/// Makes the call `call` starts, and again after [`STREAM_RETRY_PAUSE`] while `no_leader`
/// says its outcome is a cluster between leaders, up to [`STREAM_RETRIES`] times; the
/// last outcome.
async fn while_no_leader<T, Fut>(mut call: impl FnMut() -> Fut, no_leader: impl Fn(&T) -> bool) -> T
where
    Fut: std::future::Future<Output = T>,
{
    let mut retries = 0;
    loop {
        let outcome = call().await;
        if retries >= STREAM_RETRIES || !no_leader(&outcome) {
            return outcome;
        }
        retries += 1;
        tokio::time::sleep(STREAM_RETRY_PAUSE).await;
    }
}

async fn expect_success(response: reqwest::Response) -> Result<reqwest::Response, BenchError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    Err(BenchError::Status { status, body })
}

async fn drive(shared: &Arc<Shared>) -> Result<BenchReport, BenchError> {
    let progress = progress_bar(shared);
    let mut consumers = Vec::new();
    for _ in 0..shared.opts.consumers {
        let shared = Arc::clone(shared);
        consumers.push(tokio::spawn(async move {
            if shared.opts.use_http {
                consume_http(&shared).await
            } else {
                consume_grpc(&shared).await
            }
        }));
    }
    let start = Instant::now();
    let mut producers = Vec::new();
    for index in 0..shared.opts.producers {
        let shared = Arc::clone(shared);
        producers.push(tokio::spawn(
            async move { produce(&shared, index, start).await },
        ));
    }
    for producer in producers {
        producer.await??;
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let published = shared.published.load(Ordering::Relaxed);
    if shared.opts.producers > 0 {
        shared.target.store(published, Ordering::Relaxed);
    }
    let watchdog = spawn_drain_watchdog(Arc::clone(shared));
    let mut histogram = new_histogram();
    for consumer in consumers {
        let part = consumer.await??;
        // Same bounds on every histogram, so adding cannot fail.
        let _ = histogram.add(&part);
    }
    watchdog.abort();
    let consume_secs = start.elapsed().as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(report(shared, &histogram, publish_secs, consume_secs))
}

fn report(
    shared: &Shared,
    histogram: &Histogram<u64>,
    publish_secs: f64,
    consume_secs: f64,
) -> BenchReport {
    let published = shared.published.load(Ordering::Relaxed);
    let consumed = shared.consumed.load(Ordering::Relaxed);
    let size = shared.opts.size;
    let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let ms = |micros: u64| micros as f64 / 1000.0;
    BenchReport {
        transport: if shared.opts.use_http { "http" } else { "grpc" },
        mode: shared.opts.mode,
        batch: shared.opts.batch,
        window: shared.opts.window,
        queue: shared.queue.clone(),
        published,
        consumed,
        size,
        publish_msgs_per_s: per_s(published, publish_secs),
        publish_mb_per_s: per_s(published, publish_secs) * size as f64 / 1e6,
        consume_msgs_per_s: per_s(consumed, consume_secs),
        consume_mb_per_s: per_s(consumed, consume_secs) * size as f64 / 1e6,
        p50_ms: ms(histogram.value_at_quantile(0.5)),
        p90_ms: ms(histogram.value_at_quantile(0.9)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        p999_ms: ms(histogram.value_at_quantile(0.999)),
        max_ms: ms(histogram.max()),
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

fn progress_bar(shared: &Arc<Shared>) -> Option<ProgressBar> {
    if !shared.opts.progress {
        return None;
    }
    let total = shared.opts.duration.map_or(shared.opts.messages, |_| 0);
    let bar = if total > 0 {
        ProgressBar::new(total)
    } else {
        ProgressBar::new_spinner()
    };
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let ticker = bar.clone();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        while !ticker.is_finished() {
            let published = shared.published.load(Ordering::Relaxed);
            let consumed = shared.consumed.load(Ordering::Relaxed);
            ticker.set_position(consumed);
            ticker.set_message(format!("published {published}  consumed {consumed}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Some(bar)
}

/// Stops consumers that have made no progress for [`DRAIN_TIMEOUT`] once all is published.
fn spawn_drain_watchdog(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = shared.consumed.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = shared.consumed.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > DRAIN_TIMEOUT {
                shared.stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    })
}

/// How many messages producer `index` publishes (fixed-count mode).
fn share_of(total: u64, producers: usize, index: usize) -> u64 {
    let producers = producers as u64;
    let index = index as u64;
    total / producers + u64::from(index < total % producers)
}

/// Hands out the size of each publish request: the producer's share of `--messages` (or
/// until `--duration` is over), paced by `--rate`.
struct Pacer {
    remaining: u64,
    deadline: Option<Instant>,
    /// Under `--rate`, the time between two requests of this producer.
    period: Option<Duration>,
    start: Instant,
    sent: u32,
    batch: usize,
}

impl Pacer {
    fn new(opts: &BenchOptions, index: usize, start: Instant) -> Self {
        Self {
            remaining: match opts.duration {
                Some(_) => u64::MAX,
                None => share_of(opts.messages, opts.producers, index),
            },
            deadline: opts.duration.map(|d| start + d),
            period: opts.rate.map(|rate| {
                Duration::from_secs_f64(opts.batch as f64 * opts.producers as f64 / rate)
            }),
            start,
            sent: 0,
            batch: opts.batch,
        }
    }

    /// The next request's message count, after waiting for its turn; `None` when done.
    async fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        if let Some(period) = self.period {
            tokio::time::sleep_until((self.start + period * self.sent).into()).await;
        }
        self.sent += 1;
        let count = self.remaining.min(self.batch as u64) as usize;
        self.remaining -= count as u64;
        Some(count)
    }
}

async fn produce(shared: &Shared, index: usize, start: Instant) -> Result<(), BenchError> {
    let opts = &shared.opts;
    let pacer = Pacer::new(opts, index, start);
    if opts.use_http {
        let http = reqwest::Client::new();
        return windowed(shared, pacer, |count| publish_http(&http, shared, count)).await;
    }
    let client = BrokerClient::connect(opts.grpc_url.clone()).await?;
    match opts.mode {
        PublishMode::Unary => {
            windowed(shared, pacer, |count| {
                publish_grpc(client.clone(), shared, count)
            })
            .await
        }
        PublishMode::Stream => publish_stream(client, shared, pacer).await,
    }
}

/// Keeps up to `--window` publishes (made by `send`) outstanding until the pacer is done.
async fn windowed<F, Fut>(shared: &Shared, mut pacer: Pacer, mut send: F) -> Result<(), BenchError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<usize, BenchError>>,
{
    let mut in_flight = FuturesUnordered::new();
    let mut done = false;
    loop {
        while !done && in_flight.len() < shared.opts.window {
            match pacer.next().await {
                Some(count) => in_flight.push(send(count)),
                None => done = true,
            }
        }
        match in_flight.next().await {
            Some(result) => {
                shared
                    .published
                    .fetch_add(result? as u64, Ordering::Relaxed);
            }
            None => return Ok(()),
        }
    }
}

/// gRPC status code of a request a cluster could not place: no leader for the moment
/// (an election is under way); asked again.
const UNAVAILABLE: u32 = tonic::Code::Unavailable as u32;
/// How many times one request is asked again after [`UNAVAILABLE`] (or HTTP 503): about
/// 15 s of pauses, more than an election takes on a loaded machine.
const STREAM_RETRIES: u32 = 150;
/// Pause before asking again.
const STREAM_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// One `Publish` stream: up to `--window` requests unanswered, responses matched by `seq`.
/// A request answered [`UNAVAILABLE`] (a cluster between leaders) is sent again, up to
/// [`STREAM_RETRIES`] times.
async fn publish_stream(
    mut client: BrokerClient<tonic::transport::Channel>,
    shared: &Shared,
    mut pacer: Pacer,
) -> Result<(), BenchError> {
    let (requests, rx) = mpsc::channel(shared.opts.window);
    let mut responses = client.publish(ReceiverStream::new(rx)).await?.into_inner();
    // seq -> (messages, times asked again)
    let mut outstanding: std::collections::HashMap<u64, (usize, u32)> = Default::default();
    let mut again: Vec<(usize, u32)> = Vec::new();
    let mut seq = 0u64;
    let mut done = false;
    loop {
        while outstanding.len() < shared.opts.window {
            let (count, retries) = match again.pop() {
                Some(retry) => retry,
                None if done => break,
                None => match pacer.next().await {
                    Some(count) => (count, 0),
                    None => {
                        done = true;
                        break;
                    }
                },
            };
            seq += 1;
            let request = proto::PublishRequest {
                seq,
                queue: shared.queue.clone(),
                messages: (0..count).map(|_| outgoing(shared.opts.size)).collect(),
            };
            requests
                .send(request)
                .await
                .map_err(|_| BenchError::Stream("the server ended the stream".into()))?;
            outstanding.insert(seq, (count, retries));
        }
        if outstanding.is_empty() && again.is_empty() {
            break;
        }
        let response = responses
            .message()
            .await?
            .ok_or_else(|| BenchError::Stream("the server ended the stream early".into()))?;
        let (count, retries) = outstanding.remove(&response.seq).ok_or_else(|| {
            BenchError::Stream(format!("answer for unknown seq {}", response.seq))
        })?;
        if let Some(error) = &response.error
            && error.code == UNAVAILABLE
            && retries < STREAM_RETRIES
        {
            if again.is_empty() {
                tokio::time::sleep(STREAM_RETRY_PAUSE).await;
            }
            again.push((count, retries + 1));
            continue;
        }
        if let Some(error) = response.error {
            return Err(BenchError::Stream(format!(
                "request {} failed with code {}: {}",
                response.seq, error.code, error.message
            )));
        }
        shared.published.fetch_add(count as u64, Ordering::Relaxed);
    }
    drop(requests);
    while responses.message().await?.is_some() {}
    Ok(())
}

/// A bench message of `size` bytes.
fn outgoing(size: usize) -> proto::OutgoingMessage {
    proto::OutgoingMessage {
        body: payload(size),
        content_type: Some("application/octet-stream".into()),
        ..Default::default()
    }
}

/// A payload of `size` bytes stamped with the current time.
fn payload(size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u64_le(now_micros());
    buf.resize(size, b'x');
    buf.freeze()
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Microseconds since the stamp at the head of `body`, if it has one.
fn latency_micros(body: &[u8]) -> Option<u64> {
    let stamp: [u8; STAMP_BYTES] = body.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(
        now_micros()
            .saturating_sub(u64::from_le_bytes(stamp))
            .max(1),
    )
}

async fn publish_grpc(
    client: BrokerClient<tonic::transport::Channel>,
    shared: &Shared,
    count: usize,
) -> Result<usize, BenchError> {
    let messages: Vec<_> = (0..count).map(|_| outgoing(shared.opts.size)).collect();
    // No leader for the moment: asked again, as a `Publish` stream's request is.
    let send = || {
        let mut client = client.clone();
        let request = proto::SendMessageRequest {
            queue: shared.queue.clone(),
            messages: messages.clone(),
        };
        async move { client.send_message(request).await }
    };
    let unavailable = |sent: &Result<_, tonic::Status>| {
        sent.as_ref()
            .is_err_and(|status| status.code() == tonic::Code::Unavailable)
    };
    while_no_leader(send, unavailable).await?;
    Ok(count)
}

async fn publish_http(
    http: &reqwest::Client,
    shared: &Shared,
    count: usize,
) -> Result<usize, BenchError> {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let messages: Vec<_> = (0..count)
        .map(|_| serde_json::json!({ "body_base64": engine.encode(payload(shared.opts.size)) }))
        .collect();
    let url = format!(
        "{}/queues/{}/messages/batch",
        shared.opts.http_url, shared.queue
    );
    let body = serde_json::json!({ "messages": messages });
    send_http(|| http.post(&url).json(&body))
        .await
        .map(|_| count)
}

/// How many `ReceiveMessages` streams in a row a consumer opens again after they ended in
/// [`UNAVAILABLE`] (a cluster between leaders) before it gives up.
const RECEIVE_REOPENS: u32 = STREAM_RETRIES;

/// One consumer on `ReceiveMessages` streams: a stream that ends in [`UNAVAILABLE`] (its
/// queue's leader went away) is opened again after a pause, up to [`RECEIVE_REOPENS`]
/// times in a row; the leases it held go back to the group.
async fn consume_grpc(shared: &Shared) -> Result<Histogram<u64>, BenchError> {
    let mut histogram = new_histogram();
    let mut client = BrokerClient::connect(shared.opts.grpc_url.clone()).await?;
    let mut reopened = 0;
    loop {
        match receive_stream(&mut client, shared, &mut histogram).await {
            Ok(Session::Done) => return Ok(histogram),
            Ok(Session::Ended { delivered: true }) => reopened = 0,
            Ok(Session::Ended { delivered: false }) if reopened < RECEIVE_REOPENS => {}
            Ok(Session::Ended { delivered: false }) => {
                return Err(BenchError::Stream(
                    "the server ended every receive stream at once".into(),
                ));
            }
            Err(BenchError::Rpc(status))
                if status.code() == tonic::Code::Unavailable && reopened < RECEIVE_REOPENS => {}
            Err(error) => return Err(error),
        }
        reopened += 1;
        tokio::time::sleep(STREAM_RETRY_PAUSE).await;
    }
}

/// How a `ReceiveMessages` stream ended without an error.
enum Session {
    /// The consumers reached the target.
    Done,
    /// The server ended it (having delivered on it, or not): open another.
    Ended {
        /// It delivered at least one message.
        delivered: bool,
    },
}

/// One `ReceiveMessages` stream until the consumers reach the target, the server ends it
/// or it fails; each message counted is acked on it.
async fn receive_stream(
    client: &mut BrokerClient<tonic::transport::Channel>,
    shared: &Shared,
    histogram: &mut Histogram<u64>,
) -> Result<Session, BenchError> {
    let (requests, rx) = mpsc::channel(4096);
    let open = receive_request::Request::Open(proto::OpenStream {
        queue: shared.queue.clone(),
        group: GROUP.into(),
        max_in_flight: shared.opts.credit,
        visibility_ms: None,
    });
    // The receiver lives in the stream below, so this send cannot fail.
    let _ = requests
        .send(proto::ReceiveRequest {
            request: Some(open),
        })
        .await;
    let mut responses = client
        .receive_messages(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut delivered = false;
    while !shared.consumers_done() {
        let next = tokio::time::timeout(Duration::from_millis(200), responses.next()).await;
        let Ok(next) = next else { continue };
        let Some(response) = next.transpose()? else {
            return Ok(Session::Ended { delivered });
        };
        if let Some(receive_response::Response::Message(message)) = response.response {
            delivered = true;
            if !shared.claim() {
                // Past the target: it goes back with the stream's leases.
                continue;
            }
            if let Some(micros) = latency_micros(&message.body) {
                let _ = histogram.record(micros);
            }
            let ack = receive_request::Request::Ack(proto::StreamAck { id: message.id });
            if requests
                .send(proto::ReceiveRequest { request: Some(ack) })
                .await
                .is_err()
            {
                return Ok(Session::Ended { delivered });
            }
        }
    }
    // Half-closed, the stream ends once the server took the acks still on their way: none
    // of the messages counted here goes back to the group (to be counted again by another
    // consumer). What it delivers meanwhile goes back when it ends.
    drop(requests);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = responses.next().await {}
    })
    .await;
    Ok(Session::Done)
}

async fn consume_http(shared: &Shared) -> Result<Histogram<u64>, BenchError> {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let mut histogram = new_histogram();
    let http = reqwest::Client::new();
    let base = format!("{}/queues/{}/messages", shared.opts.http_url, shared.queue);
    // Long-polls return as soon as one message is there; up to 100 lets a consumer catch up.
    let url = format!("{base}?group={GROUP}&max=100&wait=1");
    while !shared.consumers_done() {
        let response = send_http(|| http.get(&url)).await?;
        let page: serde_json::Value = response.json().await?;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        let mut acks = Vec::with_capacity(messages.len());
        for message in &messages {
            let id = message["id"].as_str().unwrap_or_default();
            let (method, settle) = if shared.claim() {
                let body = message["body_base64"]
                    .as_str()
                    .and_then(|b| engine.decode(b).ok())
                    .unwrap_or_default();
                if let Some(micros) = latency_micros(&body) {
                    let _ = histogram.record(micros);
                }
                (
                    reqwest::Method::DELETE,
                    format!("{base}/{id}?group={GROUP}"),
                )
            } else {
                // Past the target: back to the queue at once, for whoever consumes next.
                let nack = format!("{base}/{id}/nack?group={GROUP}&delay=0");
                (reqwest::Method::POST, nack)
            };
            let http = &http;
            acks.push(async move { send_http(|| http.request(method.clone(), &settle)).await });
        }
        // Acks of one page go out together, as a consumer with a worker pool would send them.
        for result in futures_util::future::join_all(acks).await {
            result?;
        }
    }
    Ok(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request answered 503 (no leader for the moment) is sent again until it is
    /// answered otherwise; another error is not.
    #[tokio::test]
    async fn http_requests_are_sent_again_while_the_server_answers_503() {
        use axum::http::StatusCode;
        use std::sync::atomic::AtomicUsize;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        // One handler for every path (the API's routes live in one table elsewhere).
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let counted = Arc::clone(&counted);
            async move {
                if uri.path() == "/bad" {
                    return StatusCode::BAD_REQUEST;
                }
                match counted.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::CREATED,
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let flaky = format!("http://{addr}/flaky");
        let answered = send_http(|| http.post(&flaky)).await.unwrap();
        assert_eq!(answered.status(), reqwest::StatusCode::CREATED);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "two 503s, then the answer");
        let bad = format!("http://{addr}/bad");
        let refused = send_http(|| http.post(&bad)).await;
        assert!(matches!(
            refused,
            Err(BenchError::Status { status: 400, .. })
        ));
    }

    #[test]
    fn producer_shares_add_up() {
        for (total, producers) in [(10, 3), (1, 4), (1000, 8), (7, 7)] {
            let sum: u64 = (0..producers).map(|i| share_of(total, producers, i)).sum();
            assert_eq!(sum, total);
        }
    }

    #[test]
    fn payload_carries_its_send_time() {
        let body = payload(100);
        assert_eq!(body.len(), 100);
        let latency = latency_micros(&body).unwrap();
        assert!(latency < 60_000_000, "stamp is now, not garbage: {latency}");
        assert_eq!(latency_micros(b"short"), None);
    }

    fn options() -> BenchOptions {
        BenchOptions {
            http_url: String::new(),
            grpc_url: String::new(),
            use_http: false,
            queue: None,
            messages: 10,
            duration: None,
            rate: None,
            size: 4,
            batch: 10,
            window: 1,
            mode: PublishMode::Unary,
            producers: 1,
            consumers: 1,
            partitions: 1,
            credit: 100,
            progress: false,
        }
    }

    /// Consumers take exactly the target, however many race for the last message (a run
    /// on an existing queue used to ack one more per consumer, which the next run then
    /// waited for in vain).
    #[test]
    fn consumers_claim_no_more_than_the_target() {
        let shared = Arc::new(Shared {
            opts: options(),
            queue: "q".into(),
            published: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            target: AtomicU64::new(1_000),
            stop: AtomicBool::new(false),
        });
        let claimers: Vec<_> = (0..4)
            .map(|_| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || (0..500).filter(|_| shared.claim()).count())
            })
            .collect();
        let claimed: usize = claimers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(claimed, 1_000);
        assert_eq!(shared.consumed.load(Ordering::Relaxed), 1_000);
        assert!(shared.consumers_done());
    }

    #[test]
    fn options_are_validated() {
        let opts = options();
        assert!(matches!(validate(&opts), Err(BenchError::Invalid(_))));
        assert!(validate(&BenchOptions { size: 8, ..opts }).is_ok());
    }
}
