//! Accepted TCP connections as the servers see them: `TCP_NODELAY` set (small responses must
//! not wait for a delayed ACK) and counted in the open-connections gauge until dropped.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;

/// A TCP connection counted in `qit_connections_open{protocol}` while it lives.
pub struct Counted {
    stream: TcpStream,
    protocol: &'static str,
}

impl Counted {
    fn new(stream: TcpStream, protocol: &'static str) -> Self {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        metrics::gauge!(crate::metrics::CONNECTIONS, "protocol" => protocol).increment(1.0);
        Self { stream, protocol }
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
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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

/// The HTTP listener (axum): counted connections.
pub struct HttpListener(pub TcpListener);

/// The client's address, as a request extension of the HTTP server (per-client caps).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (Counted::new(stream, "http"), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The gRPC listener (tonic): counted connections as a stream of accepts.
pub struct GrpcIncoming(TcpListenerStream);

impl GrpcIncoming {
    /// Accepts on `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Self(TcpListenerStream::new(listener))
    }
}

impl Stream for GrpcIncoming {
    type Item = io::Result<Counted>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|next| next.map(|accepted| accepted.map(|s| Counted::new(s, "grpc"))))
    }
}
