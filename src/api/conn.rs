//! Accepted TCP connections as the servers see them, and the HTTP accept loop.
//!
//! Every connection is `TCP_NODELAY` (small responses must not wait for a delayed ACK),
//! counted in the open-connections gauge until dropped, holds one slot of the server-wide
//! connection cap ([`ConnLimits::slots`]: past it, new connections wait in the kernel's
//! backlog until one closes) and is closed after [`ConnLimits::idle_timeout`] without a
//! byte read or written. HTTP/1 clients must send a request's headers within
//! [`ConnLimits::header_timeout`] (hyper's header-read timer, which also bounds an idle
//! keep-alive connection), so slow or silent clients cannot hold connections. A failing
//! `accept` (say `EMFILE`, out of descriptors) is logged and retried after a back-off; the
//! listeners keep serving.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How often HTTP/2 connections (both listeners) are pinged: a live peer answers, so an
/// idle stream is not mistaken for a dead connection, and a dead one is found.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Longest back-off after a failed `accept`.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Limits shared by both listeners.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// One permit per open connection (HTTP and gRPC together).
    pub slots: Arc<Semaphore>,
    /// Time an HTTP/1 client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time a connection may pass without a byte read or written.
    pub idle_timeout: Duration,
}

/// A TCP connection counted in `qit_connections_open{protocol}` while it lives.
pub struct Counted {
    stream: TcpStream,
    protocol: &'static str,
    _slot: Option<OwnedSemaphorePermit>,
    idle: Option<Idle>,
    /// Writes wait one turn of the scheduler first (gRPC, see [`Counted::poll_write_vectored`]).
    coalesce: bool,
    /// The pending write already waited its turn.
    deferred: bool,
}

/// The idle timer of a connection: reset lazily (only when it fires) from the time of the
/// last byte read or written, so a busy connection costs no timer work per read. Until
/// the first byte arrives, the (shorter) first-byte timeout applies: a client that
/// connects and says nothing is dropped as soon as one that stops mid-headers.
struct Idle {
    timeout: Duration,
    /// The last traffic, `None` before the first byte.
    last_active: Option<Instant>,
    /// When the first byte must have arrived.
    first_due: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Idle {
    fn new(first_byte: Duration, timeout: Duration) -> Self {
        let first_due = Instant::now() + first_byte.min(timeout);
        Self {
            timeout,
            last_active: None,
            first_due,
            timer: Box::pin(tokio::time::sleep_until(first_due)),
        }
    }

    /// Ready with an error once the connection has been idle for the timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self
                .last_active
                .map_or(self.first_due, |at| at + self.timeout);
            if due <= Instant::now() {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ));
            }
            self.timer.as_mut().reset(due);
        }
    }
}

impl Counted {
    fn new(stream: TcpStream, protocol: &'static str) -> Self {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        metrics::gauge!(crate::metrics::CONNECTIONS, "protocol" => protocol).increment(1.0);
        Self {
            stream,
            protocol,
            _slot: None,
            idle: None,
            coalesce: protocol == "grpc",
            deferred: false,
        }
    }

    /// Holds `slot` while open; closes if the client sends nothing within `first_byte`,
    /// and after `idle_timeout` without traffic.
    fn limited(
        mut self,
        slot: OwnedSemaphorePermit,
        first_byte: Duration,
        idle_timeout: Duration,
    ) -> Self {
        self._slot = Some(slot);
        self.idle = Some(Idle::new(first_byte, idle_timeout));
        self
    }

    /// Marks traffic after a successful read or write of `n` bytes.
    fn touched(&mut self, n: usize) {
        if n > 0
            && let Some(idle) = &mut self.idle
        {
            idle.last_active = Some(Instant::now());
        }
    }

    /// True when a write should yield first (see [`Counted::poll_write_vectored`]): its
    /// task is woken to write at its next poll.
    fn yields(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.coalesce || self.deferred {
            self.deferred = false;
            return false;
        }
        self.deferred = true;
        cx.waker().wake_by_ref();
        true
    }

    /// After the stream said `Pending`: an error if the connection is idle for too long.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match &mut self.idle {
            Some(idle) => idle.poll_expired(cx).map(Err),
            None => Poll::Pending,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::CONNECTIONS, "protocol" => self.protocol).decrement(1.0);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                self.touched(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.yields(cx) {
            return Poll::Pending;
        }
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                self.touched(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    /// On a gRPC connection a write first yields once to the tasks that are ready to run:
    /// each unary call's answer is sent from a task of its own, and without the yield the
    /// connection's writer ran right after each one and wrote every answer with a
    /// `writev` of its own (a fifth of the server's time under pipelined `SendMessage`
    /// calls). After the yield, the answers completed meanwhile (a group commit
    /// completes many at once) go out in one write. The cost is one turn of the
    /// scheduler per write, a few microseconds on an idle connection.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.yields(cx) {
            return Poll::Pending;
        }
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                self.touched(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The client's address, as a request extension of the HTTP server (per-client caps).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// True for errors of one connection (the peer gave up before the accept), not of the
/// listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Accepts with `accept`, retrying failures: a connection error at once, anything else
/// (`EMFILE`, `ENFILE`, `ENOBUFS`...) after a back-off from 10 ms doubling up to 1 s,
/// logged once per back-off. Never gives up: the server keeps serving the connections it
/// has, and accepts again when descriptors are free.
pub async fn accept_with_backoff<T, F, Fut>(mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                tracing::error!(%error, retry_in = ?backoff, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Waits until a connection slot is free, then accepts one connection and takes a slot
/// for it. The slot is not held while waiting in `accept` (an idle listener must not take
/// one from the other); if the other listener took the last slot meanwhile, this one
/// connection waits for the next (so at most one accepted connection per listener is
/// over the cap).
async fn accept_limited(
    listener: &TcpListener,
    limits: &ConnLimits,
    protocol: &'static str,
) -> Option<(Counted, SocketAddr)> {
    drop(limits.slots.acquire().await.ok()?);
    let (stream, addr) = accept_with_backoff(|| listener.accept()).await;
    let slot = Arc::clone(&limits.slots).acquire_owned().await.ok()?;
    Some((
        Counted::new(stream, protocol).limited(slot, limits.header_timeout, limits.idle_timeout),
        addr,
    ))
}

/// Serves `router` on `listener` until `stop`, then lets open connections finish their
/// requests (the caller bounds how long it waits).
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stop: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .enable_connect_protocol();
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = accept_limited(&listener, &limits, "http") => accepted,
            _ = stop.cancelled() => break,
        };
        let Some((io, addr)) = accepted else { break };
        let router = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo(ClientAddr(addr)));
                router.clone().oneshot(request.map(axum::body::Body::new))
            },
        );
        let (builder, stop) = (Arc::clone(&builder), stop.clone());
        connections.spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The gRPC listener (tonic): limited, counted connections as a stream of accepts. The
/// accept loop runs in its own task and ends (closing the listener) when tonic drops the
/// stream.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: ConnLimits,
) -> ReceiverStream<Result<Counted, Infallible>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = accept_limited(&listener, &limits, "grpc") => accepted,
                _ = tx.closed() => return,
            };
            let Some((io, _)) = accepted else { return };
            if tx.send(Ok(io)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Regression (issue 19, item 9): a failing accept (here `EMFILE`, out of descriptors)
    /// is retried after a back-off instead of ending or spinning the accept loop.
    #[tokio::test]
    async fn accept_errors_back_off_and_retry() {
        let calls = AtomicUsize::new(0);
        let started = Instant::now();
        let accepted = accept_with_backoff(|| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0..3 => Err(io::Error::from_raw_os_error(24)),
                    3 => Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(accepted, 4);
        // 10 + 20 + 40 ms of back-off for the three EMFILEs, none for the aborted one.
        assert!(started.elapsed() >= Duration::from_millis(70));
    }

    /// A gRPC connection's write yields once (waking its task, so it is polled again)
    /// and goes out at the next poll; other connections write at once.
    #[tokio::test]
    async fn a_grpc_write_yields_once_then_goes_out() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;
        use tokio::io::AsyncWrite;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let bufs = [io::IoSlice::new(b"abc")];
        for (protocol, yields) in [("grpc", true), ("http", false)] {
            let (stream, _) = listener.accept().await.unwrap();
            let mut io = Counted::new(stream, protocol);
            let woken = count.0.load(Ordering::SeqCst);
            let first = Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs);
            if yields {
                assert!(first.is_pending(), "{protocol}: the first poll yields");
                assert_eq!(count.0.load(Ordering::SeqCst), woken + 1, "and wakes");
                let second = Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs);
                assert!(
                    matches!(second, Poll::Ready(Ok(3))),
                    "{protocol}: {second:?}"
                );
            } else {
                assert!(matches!(first, Poll::Ready(Ok(3))), "{protocol}: {first:?}");
            }
            drop(io);
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
                .await
                .unwrap();
            assert_eq!(got, b"abc", "{protocol}: the bytes arrive once");
            client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
        }
    }

    /// Regression (issue 19, item 9): a connection without traffic is closed after the
    /// idle timeout (it used to be held forever).
    #[tokio::test]
    async fn a_silent_connection_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let slot = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let mut io = Counted::new(stream, "test").limited(
            slot,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read(&mut io, &mut buf),
        )
        .await
        .expect("the idle timeout never fired");
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
