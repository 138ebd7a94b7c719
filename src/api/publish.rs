//! One `Publish` stream: a producer's pipelined publish requests, each answered by one
//! response carrying its `seq`.
//!
//! The session reads every request that has already arrived, starts all of them at once
//! (so that their appends are merged into one batch per partition, see
//! `log::combine`) and answers each as soon as it is stored under the server's `--fsync`
//! rule, in whatever order that happens. A bad request (unknown queue, too large, not
//! allowed, malformed content) gets a response with `error` and the stream stays open.
//!
//! On a cluster node the requests read together are stored together per queue
//! ([`Broker::publish_many`]): the queue's leader then proposes them in one entry after one
//! lookup of the group, instead of each request paying its own way there.
//!
//! Flow control: at most [`MAX_PENDING`] requests of a stream are being stored at once and
//! responses go through a bounded channel; a producer that stops reading responses stops
//! being read, so HTTP/2 flow control holds it back instead of the server buffering.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use super::error::ApiError;
use super::wire::{StreamPermit, message_ref, new_message};
use crate::auth::{Action, AuthStore, Resource};
use crate::broker::{Broker, NewMessage, Published};
use crate::proto;

/// Most requests of one stream being stored at once.
pub const MAX_PENDING: usize = 1024;
/// Responses buffered for a producer that reads them slower than they are produced.
pub const RESPONSE_BUFFER: usize = 256;

/// One open `Publish` stream.
pub struct PublishSession {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The auth store and the stream's user, when auth is on.
    pub auth: Option<(Arc<AuthStore>, String)>,
    /// Responses to the producer.
    pub tx: mpsc::Sender<Result<proto::PublishResponse, Status>>,
}

/// What a request becomes before it is stored: its queue and messages, or why not.
struct Prepared {
    seq: u64,
    queue: String,
    messages: Result<Vec<NewMessage>, Status>,
}

impl PublishSession {
    /// Serves the stream until the producer ends it (after answering everything it sent),
    /// the producer goes away, or the broker shuts down.
    pub async fn run(self, mut inbound: Streaming<proto::PublishRequest>, _permit: StreamPermit) {
        metrics::gauge!(crate::metrics::GRPC_STREAMS, "kind" => "publish").increment(1.0);
        let mut pending = FuturesUnordered::new();
        // Requests being stored (a future of `pending` may store several).
        let mut in_flight = 0usize;
        let mut reading = true;
        let mut failure: Option<Status> = None;
        'serving: while reading || !pending.is_empty() {
            tokio::select! {
                biased;
                Some(responses) = pending.next(), if !pending.is_empty() => {
                    let responses: Vec<proto::PublishResponse> = responses;
                    in_flight -= responses.len();
                    for response in responses {
                        if self.tx.send(Ok(response)).await.is_err() {
                            break 'serving;
                        }
                    }
                }
                incoming = inbound.message(), if reading && in_flight < MAX_PENDING => {
                    let mut burst = Vec::new();
                    let mut next = Some(incoming);
                    while let Some(incoming) = next.take() {
                        match incoming {
                            Ok(Some(request)) => burst.push(self.prepare(request)),
                            Ok(None) => reading = false,
                            Err(status) => {
                                reading = false;
                                failure = Some(malformed(status));
                            }
                        }
                        // Take what has already arrived, so it is stored together.
                        if reading && in_flight + burst.len() < MAX_PENDING {
                            next = inbound.message().now_or_never();
                        }
                    }
                    in_flight += burst.len();
                    for stored in self.stores(burst) {
                        pending.push(stored);
                    }
                }
                () = self.broker.until_shutdown(), if reading => {
                    reading = false;
                    failure = Some(Status::unavailable("the broker is shutting down"));
                }
                () = self.tx.closed() => break,
            }
        }
        if let Some(status) = failure {
            let _ = self.tx.send(Err(status)).await;
        }
        metrics::gauge!(crate::metrics::GRPC_STREAMS, "kind" => "publish").decrement(1.0);
    }

    /// Checks the request (grant, header names) and turns its messages into broker input.
    fn prepare(&self, request: proto::PublishRequest) -> Prepared {
        let messages = self
            .authorize(&request.queue)
            .and_then(|()| request.messages.into_iter().map(new_message).collect());
        Prepared {
            seq: request.seq,
            queue: request.queue,
            messages,
        }
    }

    /// Futures that store `burst` (requests read together), each answering the requests
    /// it stored: one per request on a single node (the partitions' appends merge
    /// anyway), one per queue on a cluster node ([`Broker::publish_many`]).
    fn stores(&self, burst: Vec<Prepared>) -> Vec<BoxFuture<'static, Vec<proto::PublishResponse>>> {
        let broker = &self.broker;
        if !broker.is_replicated() {
            return burst
                .into_iter()
                .map(|p| store(Arc::clone(broker), p).map(|r| vec![r]).boxed())
                .collect();
        }
        let mut stores = Vec::new();
        let mut by_queue: BTreeMap<String, Vec<(u64, Vec<NewMessage>)>> = BTreeMap::new();
        for prepared in burst {
            match prepared.messages {
                Ok(messages) => by_queue
                    .entry(prepared.queue)
                    .or_default()
                    .push((prepared.seq, messages)),
                Err(status) => {
                    let refused = refused(prepared.seq, &status);
                    stores.push(futures_util::future::ready(vec![refused]).boxed());
                }
            }
        }
        for (queue, requests) in by_queue {
            stores.push(store_many(Arc::clone(broker), queue, requests).boxed());
        }
        stores
    }

    fn authorize(&self, queue: &str) -> Result<(), Status> {
        let Some((store, user)) = &self.auth else {
            return Ok(());
        };
        store
            .authorize(user, Action::Publish, &Resource::queue(queue))
            .map_err(|e| Status::from(ApiError::from(e)))
    }
}

/// Stores one request's messages and makes its response.
async fn store(broker: Arc<Broker>, prepared: Prepared) -> proto::PublishResponse {
    let Prepared {
        seq,
        queue,
        messages,
    } = prepared;
    let published = match messages {
        Ok(messages) => broker.publish(&queue, messages).await.map_err(Status::from),
        Err(status) => Err(status),
    };
    response(seq, published)
}

/// Stores the requests (`seq`, messages) of one burst to `queue` together and makes their
/// responses.
async fn store_many(
    broker: Arc<Broker>,
    queue: String,
    requests: Vec<(u64, Vec<NewMessage>)>,
) -> Vec<proto::PublishResponse> {
    let (seqs, publishes): (Vec<u64>, Vec<Vec<NewMessage>>) = requests.into_iter().unzip();
    let published = broker.publish_many(&queue, publishes).await;
    seqs.into_iter()
        .zip(published)
        .map(|(seq, published)| response(seq, published.map_err(Status::from)))
        .collect()
}

/// The response to request `seq`.
fn response(seq: u64, published: Result<Vec<Published>, Status>) -> proto::PublishResponse {
    match published {
        Ok(published) => proto::PublishResponse {
            seq,
            messages: published.into_iter().map(message_ref).collect(),
            error: None,
        },
        Err(status) => refused(seq, &status),
    }
}

/// The response to request `seq` that was not stored.
fn refused(seq: u64, status: &Status) -> proto::PublishResponse {
    proto::PublishResponse {
        seq,
        messages: Vec::new(),
        error: Some(proto::PublishError {
            code: status.code() as u32,
            message: status.message().to_string(),
        }),
    }
}

/// The status that ends a stream whose next request could not be read.
fn malformed(status: Status) -> Status {
    match status.code() {
        Code::Cancelled | Code::Unavailable => status,
        _ => Status::invalid_argument(format!(
            "unreadable request on the Publish stream: {}",
            status.message()
        )),
    }
}
