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
use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatch::{self, Decoded};
use super::{Kafka, KafkaError};

/// Longest back-off after a failed `accept`.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What one connection knows about its client.
#[derive(Debug, Clone)]
pub struct Session {
    /// The authenticated user (`None` before SASL, and always with auth off).
    pub user: Option<String>,
    /// True once SaslHandshake chose PLAIN.
    pub mechanism_chosen: bool,
    /// The address the client reached us on: advertised as the broker's address.
    pub local: SocketAddr,
    /// The client's address (for the login rate limiter).
    pub peer: SocketAddr,
}

impl Session {
    /// SaslHandshake: only PLAIN is offered.
    pub fn handshake(&mut self, request: &SaslHandshakeRequest) -> SaslHandshakeResponse {
        let mut response = SaslHandshakeResponse::default();
        response.mechanisms = vec![StrBytes::from_static_str("PLAIN")];
        if request.mechanism.as_str() == "PLAIN" {
            self.mechanism_chosen = true;
        } else {
            response.error_code = ResponseError::UnsupportedSaslMechanism.code();
        }
        response
    }

    /// SaslAuthenticate with a PLAIN token (`authzid NUL user NUL password`), checked as a
    /// login against qit's users.
    pub async fn authenticate(
        &mut self,
        kafka: &Kafka,
        request: SaslAuthenticateRequest,
    ) -> SaslAuthenticateResponse {
        let mut response = SaslAuthenticateResponse::default();
        let fail = |mut response: SaslAuthenticateResponse, code: ResponseError, why: &str| {
            response.error_code = code.code();
            response.error_message = Some(StrBytes::from_string(why.to_string()));
            response
        };
        let Some(store) = kafka.auth.clone() else {
            return fail(response, ResponseError::IllegalSaslState, "auth is off");
        };
        if !self.mechanism_chosen || self.user.is_some() {
            return fail(response, ResponseError::IllegalSaslState, "no handshake");
        }
        let token = request.auth_bytes;
        let mut parts = token.split(|b| *b == 0);
        let (Some(_authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                "a PLAIN token is authzid NUL user NUL password",
            );
        };
        let (Ok(user), Ok(password)) = (
            std::str::from_utf8(user).map(str::to_string),
            std::str::from_utf8(password).map(str::to_string),
        ) else {
            return fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                "user and password must be UTF-8",
            );
        };
        let client = Some(self.peer.ip());
        let name = user.clone();
        let checked =
            tokio::task::spawn_blocking(move || store.login_from(&name, &password, client)).await;
        match checked {
            Ok(Ok(_token)) => {
                self.user = Some(user);
                response.session_lifetime_ms = 0;
                response
            }
            Ok(Err(error)) => fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                &error.to_string(),
            ),
            Err(_) => fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                "login failed",
            ),
        }
    }
}

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
            if let Err(error) = connection(stream, peer, &kafka, &stop).await {
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
