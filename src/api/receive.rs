//! One `ReceiveMessages` stream: leases messages for the consumer as its credit allows and
//! applies the acks, nacks, extends and credit it sends on the same stream.
//!
//! The session never has more unsettled messages out than its credit. It leases in chunks
//! (when at least [`refill`] slots are free, or the stream holds nothing), so a consumer
//! acking one message at a time does not cost one log read per ack; acks that arrive
//! together are applied with one journal write. A lease whose message another call acked
//! (a unary ack, HTTP, another node) stops counting once this node has applied the ack.
//! When the stream ends, its unsettled leases go back to the group at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, OptionFuture};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use super::wire::{StreamPermit, message, message_id, millis};
use crate::broker::{self, Broker, BrokerError, Delivery, MessageId};
use crate::proto::{self, receive_request, receive_response};

/// How long one lease attempt waits before the session re-checks its inputs.
const STREAM_POLL: Duration = Duration::from_secs(1);
/// How often leases that ran out are dropped from the credit count.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Most requests taken off the stream at once (and acks applied with one journal write).
const MAX_DRAIN: usize = 1024;

/// A lease attempt in flight.
type PendingLease = BoxFuture<'static, Result<Vec<Delivery>, BrokerError>>;

/// Free slots that make a lease worth its log read: a quarter of the credit, at most 64.
pub fn refill(credit: u64) -> u64 {
    (credit / 4).clamp(1, 64)
}

/// One open `ReceiveMessages` stream.
pub struct Session {
    broker: Arc<Broker>,
    queue: String,
    group: String,
    /// Lease duration (the queue's `ack_timeout` unless the stream asked otherwise).
    visibility: Duration,
    /// Most unsettled messages out at once.
    credit: u64,
    /// Leased on this stream and not settled, with when the lease runs out.
    outstanding: HashMap<MessageId, Instant>,
    /// Wakes when messages of the group become done by another call (a unary or HTTP
    /// ack, another node's): those leases stop counting against the credit. Taken once
    /// the group is known to exist (after the first delivery).
    done: Option<watch::Receiver<u64>>,
    /// Responses to the consumer.
    tx: mpsc::Sender<Result<proto::ReceiveResponse, Status>>,
}

impl Session {
    /// A stream consuming `queue` for `group`, leasing for `visibility`, with `credit`
    /// unsettled messages out at most, answering on `tx`.
    pub fn new(
        broker: Arc<Broker>,
        queue: String,
        group: String,
        visibility: Duration,
        credit: u64,
        tx: mpsc::Sender<Result<proto::ReceiveResponse, Status>>,
    ) -> Self {
        Self {
            broker,
            queue,
            group,
            visibility,
            credit,
            outstanding: HashMap::new(),
            done: None,
            tx,
        }
    }

    fn room(&self) -> u64 {
        self.credit.saturating_sub(self.outstanding.len() as u64)
    }

    fn wants_lease(&self) -> bool {
        let room = self.room();
        room > 0 && (self.outstanding.is_empty() || room >= refill(self.credit))
    }

    /// Whether leases settled elsewhere should be looked for: the stream waits for room.
    fn watches_done(&self) -> bool {
        self.done.is_some() && !self.outstanding.is_empty() && !self.wants_lease()
    }

    /// Forgets the outstanding leases whose messages are done for the group (settled by
    /// a unary call, or by another node), so that they free their credit at once rather
    /// than when their lease would have run out.
    fn forget_done(&mut self) {
        let ids: Vec<MessageId> = self.outstanding.keys().copied().collect();
        match self.broker.done_among(&self.queue, &self.group, &ids) {
            Ok(done) => {
                for id in done {
                    self.outstanding.remove(&id);
                }
            }
            // The group is gone: its leases went with it, and nothing marks them done.
            Err(_) => self.done = None,
        }
    }

    /// Serves the stream until the consumer or the broker ends it.
    pub async fn run(
        mut self,
        mut inbound: Streaming<proto::ReceiveRequest>,
        _permit: StreamPermit,
    ) {
        metrics::gauge!(crate::metrics::GRPC_STREAMS, "kind" => "receive").increment(1.0);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        // The lease in flight lives across turns of the loop: dropping it when another
        // branch wins could lose what it leased (a lease forwarded to a cluster leader is
        // taken there even if this side stops waiting), and the messages would come back
        // only when the lease runs out.
        let mut lease: Option<PendingLease> = None;
        loop {
            if self.broker.is_shutting_down() {
                // Never wait on a consumer that stopped reading: shutdown joins this task.
                let _ = self
                    .tx
                    .try_send(Err(Status::unavailable("the broker is shutting down")));
                break;
            }
            if lease.is_none() && self.wants_lease() {
                lease = Some(self.start_lease());
            }
            tokio::select! {
                biased;
                incoming = inbound.next() => match incoming {
                    Some(Ok(first)) => {
                        let (requests, open) = drain(first, &mut inbound);
                        self.handle_all(requests).await;
                        if !open {
                            break;
                        }
                    }
                    _ => break,
                },
                leased = OptionFuture::from(lease.as_mut()), if lease.is_some() => {
                    lease = None;
                    let Some(leased) = leased else { continue };
                    if !self.deliver(leased).await {
                        break;
                    }
                }
                changed = done_changed(&mut self.done), if self.watches_done() => {
                    if changed {
                        self.forget_done();
                    } else {
                        self.done = None;
                    }
                }
                _ = prune.tick() => {
                    let now = Instant::now();
                    self.outstanding.retain(|_, deadline| *deadline > now);
                    if self.watches_done() {
                        // Acks that woke no stream: another stream's, of a lease of this one.
                        self.forget_done();
                    }
                    self.watch_done();
                }
                _ = self.tx.closed() => break,
            }
        }
        // A lease still on its way stops before the stream's leases go back: else it could
        // take them again for nobody (a lease forwarded to a cluster leader goes on there,
        // long-polling, until its call is dropped). What it got already goes back with them.
        if let Some(mut pending) = lease.take() {
            if let Some(Ok(leased)) = pending.as_mut().now_or_never() {
                let now = Instant::now();
                self.outstanding
                    .extend(leased.into_iter().map(|d| (d.id, now)));
            }
            drop(pending);
        }
        self.return_leases().await;
        metrics::gauge!(crate::metrics::GRPC_STREAMS, "kind" => "receive").decrement(1.0);
    }

    /// Starts one lease attempt for the room the stream has now.
    fn start_lease(&self) -> PendingLease {
        let broker = Arc::clone(&self.broker);
        let (queue, group) = (self.queue.clone(), self.group.clone());
        let max = self.room().min(broker::MAX_RECEIVE as u64).max(1) as usize;
        let visibility = self.visibility;
        Box::pin(async move {
            broker
                .receive(&queue, &group, max, STREAM_POLL, Some(visibility))
                .await
        })
    }

    /// Sends one response; false when the consumer is gone or the broker stops first (a
    /// consumer that stopped reading must not hold up shutdown, which joins this task).
    async fn send(&self, response: Result<proto::ReceiveResponse, Status>) -> bool {
        tokio::select! {
            sent = self.tx.send(response) => sent.is_ok(),
            _ = self.broker.until_shutdown() => false,
        }
    }

    /// Sends leased messages; false when the stream is over.
    async fn deliver(&mut self, leased: Result<Vec<Delivery>, BrokerError>) -> bool {
        let list = match leased {
            Ok(list) => list,
            Err(error) => {
                self.send(Err(error.into())).await;
                return false;
            }
        };
        let deadline = Instant::now() + self.visibility;
        for d in list {
            self.outstanding.insert(d.id, deadline);
            let response = proto::ReceiveResponse {
                response: Some(receive_response::Response::Message(message(d))),
            };
            // What was not sent is outstanding and goes back with the stream's leases.
            if !self.send(Ok(response)).await {
                return false;
            }
        }
        self.watch_done();
        true
    }

    /// Starts watching the group for messages becoming done, once the stream holds
    /// leases (the group exists then; on a cluster node that does not lead the queue, once
    /// the leader's delivery counts reached it), and forgets those done before.
    fn watch_done(&mut self) {
        if self.done.is_some() || self.outstanding.is_empty() {
            return;
        }
        if let Ok(done) = self.broker.watch_done(&self.queue, &self.group) {
            self.done = Some(done);
            self.forget_done();
        }
    }

    /// Applies requests in order; runs of acks go to the broker together.
    async fn handle_all(&mut self, requests: Vec<proto::ReceiveRequest>) {
        use receive_request::Request as R;
        let mut acks: Vec<String> = Vec::new();
        for request in requests {
            match request.request {
                Some(R::Ack(a)) => acks.push(a.id),
                other => {
                    self.ack_all(std::mem::take(&mut acks)).await;
                    self.handle(other).await;
                }
            }
        }
        self.ack_all(acks).await;
    }

    async fn ack_all(&mut self, raw: Vec<String>) {
        if raw.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(raw.len());
        let mut raw_ids = Vec::with_capacity(raw.len());
        for id in raw {
            match message_id(&id) {
                Ok(parsed) => {
                    self.outstanding.remove(&parsed);
                    ids.push(parsed);
                    raw_ids.push(id);
                }
                Err(status) => self.report(id, status).await,
            }
        }
        let acked = self
            .broker
            .ack_many_from_stream(&self.queue, &self.group, &ids)
            .await;
        // On a cluster this node applied the acks and signalled them: not news here.
        if let Some(done) = &mut self.done {
            done.borrow_and_update();
        }
        let results = match acked {
            Ok(results) => results,
            Err(error) => {
                // The queue or group is gone: one error for the whole run.
                self.report(String::new(), error.into()).await;
                return;
            }
        };
        for (id, result) in raw_ids.into_iter().zip(results) {
            if let Err(error) = result {
                self.report(id, error.into()).await;
            }
        }
    }

    async fn handle(&mut self, request: Option<receive_request::Request>) {
        use receive_request::Request as R;
        let (id, result) = match request {
            Some(R::Credit(c)) => {
                self.credit = self.credit.saturating_add(u64::from(c.add));
                return;
            }
            Some(R::Ack(a)) => {
                self.ack_all(vec![a.id]).await;
                return;
            }
            Some(R::Nack(n)) => (n.id.clone(), self.nack(&n.id, n.delay_ms.map(millis)).await),
            Some(R::Extend(e)) => (e.id.clone(), self.extend(&e.id, e.visibility_ms).await),
            Some(R::Open(_)) | None => (
                String::new(),
                Err(Status::invalid_argument("the stream is already open")),
            ),
        };
        if let Err(status) = result {
            self.report(id, status).await;
        }
    }

    /// Tells the consumer that the request about `id` failed; the stream goes on.
    async fn report(&self, id: String, status: Status) {
        let error = proto::StreamError {
            id,
            code: format!("{:?}", status.code()),
            message: status.message().to_string(),
        };
        let response = proto::ReceiveResponse {
            response: Some(receive_response::Response::Error(error)),
        };
        self.send(Ok(response)).await;
    }

    async fn nack(&mut self, raw: &str, delay: Option<Duration>) -> Result<(), Status> {
        let id = message_id(raw)?;
        self.outstanding.remove(&id);
        self.broker
            .nack(&self.queue, &self.group, id, delay)
            .await?;
        Ok(())
    }

    async fn extend(&mut self, raw: &str, visibility_ms: u64) -> Result<(), Status> {
        let id = message_id(raw)?;
        let visibility = millis(visibility_ms);
        self.broker
            .extend(&self.queue, &self.group, id, visibility)
            .await?;
        if let Some(deadline) = self.outstanding.get_mut(&id) {
            *deadline = Instant::now() + visibility;
        }
        Ok(())
    }

    /// The stream ended: its unsettled leases go back to the group at once (together: on
    /// a cluster one call to the leader and one delivery-count entry, not one per lease).
    async fn return_leases(&mut self) {
        let ids: Vec<MessageId> = self.outstanding.drain().map(|(id, _)| id).collect();
        if let Err(error) = self.broker.release(&self.queue, &self.group, &ids).await {
            tracing::debug!(%error, queue = %self.queue, "returning a stream's leases failed");
        }
    }
}

/// Waits for the next change of `done`; false when its group is gone. Never ready
/// without a watch.
async fn done_changed(done: &mut Option<watch::Receiver<u64>>) -> bool {
    match done {
        Some(done) => done.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// `first` plus every request already waiting on the stream (up to [`MAX_DRAIN`]); false
/// when the stream ended or failed meanwhile.
fn drain(
    first: proto::ReceiveRequest,
    inbound: &mut Streaming<proto::ReceiveRequest>,
) -> (Vec<proto::ReceiveRequest>, bool) {
    let mut requests = vec![first];
    while requests.len() < MAX_DRAIN {
        // `Streaming::next` keeps its state in the stream, so dropping a pending poll loses
        // nothing.
        match inbound.next().now_or_never() {
            Some(Some(Ok(request))) => requests.push(request),
            Some(Some(Err(_)) | None) => return (requests, false),
            None => break,
        }
    }
    (requests, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_is_a_quarter_of_the_credit_within_bounds() {
        assert_eq!(refill(1), 1);
        assert_eq!(refill(10), 2);
        assert_eq!(refill(100), 25);
        assert_eq!(refill(1000), 64);
    }
}
