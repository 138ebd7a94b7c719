//! The Kafka accept loop and its connections.
//!
//! A connection reads one size-prefixed frame at a time (at most
//! [`super::KafkaConfig::max_frame_bytes`]; a larger, negative or tiny size closes it),
//! serves it and writes the response before reading the next, so responses go out in
//! request order as Kafka clients expect (Kafka itself serves a connection this way). A
//! long-polling Fetch or a JoinGroup waiting for the other members holds only its own
//! connection; clients use separate connections for their group coordinator. Every wait
//! races the listener's stop. With auth on, only ApiVersions and the SASL exchange are
//! served until SASL/PLAIN succeeds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatch::{self, Decoded};
use super::session::Session;
use super::{Kafka, KafkaError};

/// Longest back-off after a failed `accept`.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections until `stop`, each served on its own task of `tasks`.
pub async fn serve(
    listener: TcpListener,
    kafka: Arc<Kafka>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(kafka.config.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(error) => {
                tracing::warn!(%error, "kafka accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let (kafka, stop) = (Arc::clone(&kafka), stop.clone());
        tasks.spawn(async move {
            let open = metrics::gauge!(crate::metrics::CONNECTIONS, "protocol" => "kafka");
            open.increment(1.0);
            let served = connection(stream, peer, &kafka, &stop).await;
            open.decrement(1.0);
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "kafka connection closed");
            }
            drop(slot);
        });
    }
}

/// Serves one connection until the client leaves, a frame is bad, or `stop`.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    kafka: &Kafka,
    stop: &CancellationToken,
) -> Result<(), KafkaError> {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr()?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(64 * 1024, read);
    let mut session = Session {
        user: None,
        mechanism_chosen: false,
        local,
        peer,
    };
    let idle = Duration::from_secs(kafka.config.idle_timeout_secs);
    loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(idle, read_frame(&mut read, kafka.config.max_frame_bytes)) => match frame {
                Ok(frame) => frame?,
                Err(_) => return Ok(()),
            },
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(frame) = frame else {
            return Ok(());
        };
        // On a cluster node, from a confirmed view of the topics (one that started or was
        // paused a moment ago waits for it; see `cluster::metadata_catch_up`). One still
        // known to be behind closes the connection: the client reconnects and asks again,
        // as after any broker's hiccup (a Kafka request has no error common to every API).
        if let Some(cluster) = &kafka.cluster
            && let Err(behind) = cluster.metadata_ready().await
        {
            tracing::debug!("closing a Kafka connection: {behind}");
            return Ok(());
        }
        let response = tokio::select! {
            response = respond(kafka, &mut session, frame) => response?,
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(response) = response else {
            continue;
        };
        write.write_all(&response).await?;
    }
}

/// One request to its response frame; `None` when nothing is to be sent.
async fn respond(
    kafka: &Kafka,
    session: &mut Session,
    frame: Bytes,
) -> Result<Option<BytesMut>, KafkaError> {
    let request = match dispatch::decode(frame)? {
        Decoded::Answer(answer) => return Ok(Some(answer)),
        Decoded::Request(request) => request,
    };
    let open = matches!(
        request.api,
        ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
    );
    if kafka.auth.is_some() && session.user.is_none() && !open {
        return Err(KafkaError::Forbidden(format!(
            "{:?} before SASL authentication",
            request.api
        )));
    }
    let (api, version, correlation_id) =
        (request.api, request.version, request.header.correlation_id);
    match dispatch::serve(kafka, session, *request).await? {
        Some(response) => Ok(Some(dispatch::encode(
            api,
            version,
            correlation_id,
            &response,
        )?)),
        None => Ok(None),
    }
}

/// Reads one frame: `None` at a clean end of stream.
async fn read_frame(
    read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    max: usize,
) -> Result<Option<Bytes>, KafkaError> {
    let size = match read.read_i32().await {
        Ok(size) => size,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let too_big = || KafkaError::FrameSize {
        size: i64::from(size),
        max,
    };
    let size = usize::try_from(size).map_err(|_| too_big())?;
    if !(8..=max).contains(&size) {
        return Err(too_big());
    }
    // Grown as bytes arrive: a size prefix alone reserves little.
    let mut frame = Vec::with_capacity(size.min(64 * 1024));
    (&mut *read)
        .take(size as u64)
        .read_to_end(&mut frame)
        .await?;
    if frame.len() != size {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(Bytes::from(frame)))
}
