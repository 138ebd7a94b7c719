//! The gRPC API (tonic): unary rpcs, the `Publish` stream (see [`super::publish`]), the
//! credit-based `ReceiveMessages` stream and the `Subscribe` replay-then-follow stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::authenticate;
use super::error::ApiError;
use super::limits::ClientLimits;
use super::publish::PublishSession;
use super::receive::Session;
use super::wire::{StreamPermit, message, message_id, message_ref, millis, new_message};
use crate::auth::{Action, AuthStore, Resource};
use crate::broker::{self, Broker, BrokerError, ReadFrom, SeekTarget};
use crate::proto::{self, broker_server, receive_request, seek_group_request, subscribe_request};

/// Default credit when a stream opens with `max_in_flight = 0`.
const DEFAULT_CREDIT: u64 = 100;
/// How often a `Subscribe` stream on a cluster node without a replica of its queue asks a
/// replica for new messages once it has read them all.
const REMOTE_POLL: Duration = Duration::from_millis(250);
/// Most messages one `Subscribe` read returns.
const SUBSCRIBE_BATCH: usize = 500;
/// Bytes of messages a `Subscribe` stream holds that its reader has not taken yet. When a
/// reader is slower than the log, the stream stops reading the log (HTTP/2 flow control
/// then keeps what is sent bounded too) instead of buffering.
pub const SUBSCRIBE_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// An item of a `Subscribe` stream with its share of the stream's byte budget, released
/// when the server takes the item to send it.
type Budgeted = (
    Result<proto::SubscribeResponse, Status>,
    Option<OwnedSemaphorePermit>,
);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC service.
#[derive(Clone)]
pub struct GrpcApi {
    broker: Arc<Broker>,
    streams: Arc<Semaphore>,
    per_client: Arc<ClientLimits>,
    auth: Option<Arc<AuthStore>>,
}

impl GrpcApi {
    /// A service over `broker` allowing `max_streams` concurrent streams.
    pub fn new(broker: Arc<Broker>, max_streams: usize) -> Self {
        Self {
            broker,
            streams: Arc::new(Semaphore::new(max_streams)),
            per_client: ClientLimits::new(max_streams),
            auth: None,
        }
    }

    /// Caps open streams per client address.
    pub fn with_per_client(mut self, per_client: usize) -> Self {
        self.per_client = ClientLimits::new(per_client);
        self
    }

    /// Requires tokens and checks grants with `auth` (`None`: auth off).
    pub fn with_auth(mut self, auth: Option<Arc<AuthStore>>) -> Self {
        self.auth = auth;
        self
    }

    /// Authenticates the caller from `authorization` metadata and checks `need`.
    fn check<T>(
        &self,
        request: &Request<T>,
        need: Option<(Action, Resource)>,
    ) -> Result<Option<String>, Status> {
        let Some(store) = &self.auth else {
            return Ok(None);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let user = authenticate(store, header).map_err(Status::from)?;
        if let Some((action, resource)) = need {
            store.authorize(&user, action, &resource).map_err(|e| {
                Status::from(super::auth::refusal(&self.broker, action, &resource, e))
            })?;
        }
        Ok(Some(user))
    }

    /// [`Self::check`] of `action` on the queue the request names.
    fn check_queue<T: NamesQueue>(
        &self,
        request: &Request<T>,
        action: Action,
    ) -> Result<Option<String>, Status> {
        let queue = Resource::queue(request.get_ref().queue());
        self.check(request, Some((action, queue)))
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> broker_server::BrokerServer<Self> {
        broker_server::BrokerServer::new(self)
            .max_decoding_message_size(80 * 1024 * 1024)
            .max_encoding_message_size(80 * 1024 * 1024)
    }

    fn stream_permit<T>(&self, request: &Request<T>) -> Result<StreamPermit, Status> {
        let total = Arc::clone(&self.streams)
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many open streams"))?;
        let mine = match request.remote_addr() {
            Some(addr) => Some(self.per_client.acquire(addr.ip()).ok_or_else(|| {
                Status::resource_exhausted("too many open streams from this client")
            })?),
            None => None,
        };
        Ok((total, mine))
    }
}

/// A request that names one queue: the resource its caller's right is checked on.
trait NamesQueue {
    fn queue(&self) -> &str;
}

macro_rules! names_queue {
    ($($request:ty),* $(,)?) => {
        $(impl NamesQueue for $request {
            fn queue(&self) -> &str {
                &self.queue
            }
        })*
    };
}

names_queue!(
    proto::CreateQueueRequest,
    proto::DeleteQueueRequest,
    proto::SendMessageRequest,
    proto::AckMessageRequest,
    proto::NackMessageRequest,
    proto::ExtendLeaseRequest,
    proto::SubscribeRequest,
    proto::GetGroupRequest,
    proto::SeekGroupRequest,
    proto::DeleteGroupRequest,
);

fn settings_from_proto(p: Option<proto::QueueSettings>) -> broker::QueueSettings {
    let mut s = broker::QueueSettings::default();
    let Some(p) = p else { return s };
    if let Some(v) = p.partitions {
        s.partitions = v;
    }
    if let Some(v) = p.ack_timeout_secs {
        s.ack_timeout = v;
    }
    if let Some(v) = p.max_deliveries {
        s.max_deliveries = v;
    }
    if p.dead_letter.is_some() {
        s.dead_letter = p.dead_letter;
    }
    if !p.backoff_secs.is_empty() {
        s.backoff = p.backoff_secs;
    }
    if let Some(r) = p.retention {
        s.retention.max_age = r.max_age_secs;
        s.retention.max_bytes = r.max_bytes;
        if r.policy.as_deref() == Some("acked") {
            s.retention.policy = broker::RetentionPolicy::Acked;
        }
    }
    if let Some(v) = p.compaction {
        s.compaction = v;
    }
    if let Some(v) = p.max_in_flight {
        s.max_in_flight = v;
    }
    if p.ordering.as_deref() == Some("key") {
        s.ordering = broker::Ordering::Key;
    }
    if let Some(v) = p.dedup_window_secs {
        s.dedup_window = v;
    }
    if let Some(v) = p.max_message_bytes {
        s.max_message_bytes = v;
    }
    if let Some(v) = p.segment_bytes {
        s.segment_bytes = v;
    }
    s.replicas = p.replicas;
    s
}

fn check_enum(value: Option<&str>, field: &str, allowed: &[&str]) -> Result<(), Status> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(Status::invalid_argument(format!(
            "`{field}` must be one of {allowed:?}"
        ))),
        _ => Ok(()),
    }
}

fn queue_info(info: broker::QueueInfo) -> proto::QueueInfo {
    proto::QueueInfo {
        settings_json: serde_json::to_string(&info.settings).unwrap_or_default(),
        name: info.name,
        partitions: info
            .partitions
            .into_iter()
            .map(|p| proto::PartitionInfo {
                partition: p.partition,
                first_offset: p.first_offset,
                next_offset: p.next_offset,
                segments: p.segments,
                bytes: p.bytes,
            })
            .collect(),
        groups: info
            .groups
            .into_iter()
            .map(|g| proto::GroupSummary {
                name: g.name,
                backlog: g.backlog,
                in_flight: g.in_flight,
                dead_lettered: g.dead_lettered,
            })
            .collect(),
    }
}

fn group_name(group: &str) -> &str {
    if group.is_empty() { "default" } else { group }
}

#[tonic::async_trait]
impl broker_server::Broker for GrpcApi {
    async fn create_queue(
        &self,
        request: Request<proto::CreateQueueRequest>,
    ) -> Result<Response<proto::CreateQueueResponse>, Status> {
        let user = self.check_queue(&request, Action::Create)?;
        let r = request.into_inner();
        if let Some(s) = &r.settings {
            check_enum(s.ordering.as_deref(), "ordering", &["none", "key"])?;
            check_enum(
                s.retention.as_ref().and_then(|r| r.policy.as_deref()),
                "retention.policy",
                &["limits", "acked"],
            )?;
        }
        let settings = settings_from_proto(r.settings);
        let (auth, user) = (self.auth.as_deref(), user.as_deref());
        super::auth::check_existing_visible(auth, user, &self.broker, &r.queue)?;
        super::auth::check_dead_letter(auth, user, &self.broker, &r.queue, &settings)
            .map_err(|e| Status::from(ApiError::from(e)))?;
        let owner = super::auth::creator(auth, user);
        let created = self
            .broker
            .create_queue_owned(&r.queue, settings, owner)
            .await?;
        super::auth::check_created_queue(auth, user, &self.broker, &r.queue, &created).await?;
        Ok(Response::new(proto::CreateQueueResponse {
            queue: Some(queue_info(created.info)),
            created: created.created,
        }))
    }

    async fn delete_queue(
        &self,
        request: Request<proto::DeleteQueueRequest>,
    ) -> Result<Response<proto::DeleteQueueResponse>, Status> {
        self.check_queue(&request, Action::Manage)?;
        let queue = request.into_inner().queue;
        // The delete forgets the queue's owner and grants in the same step.
        self.broker.delete_queue(&queue).await?;
        Ok(Response::new(proto::DeleteQueueResponse {}))
    }

    async fn list_queues(
        &self,
        request: Request<proto::ListQueuesRequest>,
    ) -> Result<Response<proto::ListQueuesResponse>, Status> {
        let user = self.check(&request, None)?;
        let auth = self.auth.as_deref();
        let visible = self
            .broker
            .list_queues()
            .into_iter()
            .filter(|info| super::auth::may_view(auth, user.as_deref(), &info.name))
            .collect();
        let queues = self
            .broker
            .current_queue_infos(visible)
            .await
            .into_iter()
            .map(queue_info)
            .collect();
        Ok(Response::new(proto::ListQueuesResponse { queues }))
    }

    async fn get_queue(
        &self,
        request: Request<proto::GetQueueRequest>,
    ) -> Result<Response<proto::QueueInfo>, Status> {
        let queue = &request.get_ref().queue;
        // A queue that does not exist is a NOT_FOUND to everyone.
        let need = self
            .broker
            .queue_settings(queue)
            .is_ok()
            .then(|| (Action::View, Resource::queue(queue)));
        self.check(&request, need)?;
        let queue = request.into_inner().queue;
        let info = self.broker.current_queue_info(&queue).await?;
        Ok(Response::new(queue_info(info)))
    }

    async fn send_message(
        &self,
        request: Request<proto::SendMessageRequest>,
    ) -> Result<Response<proto::SendMessageResponse>, Status> {
        // The hot path: no resource name is built when auth is off.
        if self.auth.is_some() {
            self.check_queue(&request, Action::Publish)?;
        }
        let r = request.into_inner();
        let messages = r
            .messages
            .into_iter()
            .map(new_message)
            .collect::<Result<Vec<_>, Status>>()?;
        let published = self.broker.publish(&r.queue, messages).await?;
        Ok(Response::new(proto::SendMessageResponse {
            messages: published.into_iter().map(message_ref).collect(),
        }))
    }

    type PublishStream = BoxStream<proto::PublishResponse>;

    async fn publish(
        &self,
        request: Request<Streaming<proto::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let user = self.check(&request, None)?;
        let permit = self.stream_permit(&request)?;
        let (tx, rx) = mpsc::channel(super::publish::RESPONSE_BUFFER);
        let session = PublishSession {
            broker: Arc::clone(&self.broker),
            auth: self.auth.clone().zip(user),
            tx,
        };
        tokio::spawn(session.run(request.into_inner(), permit));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_message(
        &self,
        request: Request<proto::AckMessageRequest>,
    ) -> Result<Response<proto::AckMessageResponse>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let r = request.into_inner();
        self.broker
            .ack(&r.queue, group_name(&r.group), message_id(&r.id)?)
            .await?;
        Ok(Response::new(proto::AckMessageResponse {}))
    }

    async fn nack_message(
        &self,
        request: Request<proto::NackMessageRequest>,
    ) -> Result<Response<proto::NackMessageResponse>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let r = request.into_inner();
        self.broker
            .nack(
                &r.queue,
                group_name(&r.group),
                message_id(&r.id)?,
                r.delay_ms.map(millis),
            )
            .await?;
        Ok(Response::new(proto::NackMessageResponse {}))
    }

    async fn extend_lease(
        &self,
        request: Request<proto::ExtendLeaseRequest>,
    ) -> Result<Response<proto::ExtendLeaseResponse>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let r = request.into_inner();
        self.broker
            .extend(
                &r.queue,
                group_name(&r.group),
                message_id(&r.id)?,
                millis(r.visibility_ms),
            )
            .await?;
        Ok(Response::new(proto::ExtendLeaseResponse {}))
    }

    type ReceiveMessagesStream = BoxStream<proto::ReceiveResponse>;

    async fn receive_messages(
        &self,
        request: Request<Streaming<proto::ReceiveRequest>>,
    ) -> Result<Response<Self::ReceiveMessagesStream>, Status> {
        let user = self.check(&request, None)?;
        let permit = self.stream_permit(&request)?;
        let mut inbound = request.into_inner();
        let open = match inbound.message().await?.and_then(|m| m.request) {
            Some(receive_request::Request::Open(open)) => open,
            _ => return Err(Status::invalid_argument("the first message must be `open`")),
        };
        let group = group_name(&open.group).to_string();
        crate::name::check(&group).map_err(BrokerError::from)?;
        if let (Some(store), Some(user)) = (&self.auth, &user) {
            store
                .authorize(user, Action::Consume, &Resource::queue(&open.queue))
                .map_err(|e| Status::from(ApiError::from(e)))?;
        }
        let settings = self.broker.queue_settings(&open.queue)?;
        let visibility = open
            .visibility_ms
            .map_or(Duration::from_secs(settings.ack_timeout), millis);
        broker::check_lease_duration("visibility_ms", visibility)?;
        let (tx, rx) = mpsc::channel(256);
        let credit = match open.max_in_flight {
            0 => DEFAULT_CREDIT,
            n => u64::from(n),
        };
        let session = Session::new(
            Arc::clone(&self.broker),
            open.queue,
            group,
            visibility,
            credit,
            tx,
        );
        self.broker.tasks().spawn(session.run(inbound, permit));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<proto::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let permit = self.stream_permit(&request)?;
        let r = request.into_inner();
        let from = match r.start {
            Some(subscribe_request::Start::FromTimeMs(ms)) => ReadFrom::Time(ms),
            Some(subscribe_request::Start::FromOffset(offset)) => ReadFrom::Offset(offset),
            None => ReadFrom::Offset(0),
        };
        // Resolve the start now so that a bad queue or partition fails the call itself.
        let (first, start) = self
            .broker
            .read_current_log(&r.queue, r.partition, from, 1)
            .await?;
        let start = match from {
            ReadFrom::Time(_) => first.first().map_or(start, |d| d.id.offset),
            ReadFrom::Offset(offset) => offset,
        };
        let (tx, rx) = mpsc::channel(SUBSCRIBE_BATCH);
        let broker = Arc::clone(&self.broker);
        let budget = Arc::new(Semaphore::new(SUBSCRIBE_BUFFER_BYTES));
        self.broker.tasks().spawn(async move {
            let _permit = permit;
            follow(
                broker,
                r.queue,
                r.partition,
                start,
                Budget { tx, bytes: budget },
            )
            .await;
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|(item, _share)| item),
        )))
    }

    async fn get_group(
        &self,
        request: Request<proto::GetGroupRequest>,
    ) -> Result<Response<proto::GroupInfo>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let r = request.into_inner();
        let info = self
            .broker
            .current_group_info(&r.queue, group_name(&r.group))
            .await?;
        Ok(Response::new(group_info(info)))
    }

    async fn seek_group(
        &self,
        request: Request<proto::SeekGroupRequest>,
    ) -> Result<Response<proto::GroupInfo>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let r = request.into_inner();
        let target = seek_target(r.target)?;
        let info = self
            .broker
            .seek(&r.queue, group_name(&r.group), target)
            .await?;
        Ok(Response::new(group_info(info)))
    }

    async fn delete_group(
        &self,
        request: Request<proto::DeleteGroupRequest>,
    ) -> Result<Response<proto::DeleteGroupResponse>, Status> {
        self.check_queue(&request, Action::Consume)?;
        let r = request.into_inner();
        self.broker
            .delete_group(&r.queue, group_name(&r.group))
            .await?;
        Ok(Response::new(proto::DeleteGroupResponse {}))
    }
}

fn group_info(info: broker::GroupInfo) -> proto::GroupInfo {
    proto::GroupInfo {
        queue: info.queue,
        name: info.name,
        partitions: info
            .partitions
            .into_iter()
            .map(|p| proto::GroupPartition {
                partition: p.partition,
                committed_offset: p.committed_offset,
                backlog: p.backlog,
                in_flight: p.in_flight,
            })
            .collect(),
        backlog: info.backlog,
        in_flight: info.in_flight,
        redelivered: info.redelivered,
        dead_lettered: info.dead_lettered,
    }
}

/// Where a `SeekGroup` moves its group: exactly one target, as the HTTP seek takes.
fn seek_target(target: Option<seek_group_request::Target>) -> Result<SeekTarget, Status> {
    use seek_group_request::Target;
    match target {
        Some(Target::Offset(p)) => Ok(SeekTarget::Offset {
            partition: p.partition,
            offset: p.offset,
        }),
        Some(Target::FromTimeMs(ms)) if ms >= 0 => Ok(SeekTarget::Time(ms)),
        Some(Target::FromTimeMs(ms)) => Err(Status::invalid_argument(format!(
            "from_time_ms must be unix milliseconds, not {ms}"
        ))),
        Some(Target::To(to)) => match to.as_str() {
            "earliest" => Ok(SeekTarget::Earliest),
            "latest" => Ok(SeekTarget::Latest),
            _ => Err(Status::invalid_argument(format!(
                "to must be \"earliest\" or \"latest\", not {to:?}"
            ))),
        },
        None => Err(Status::invalid_argument(
            "give exactly one target: offset, from_time_ms or to",
        )),
    }
}

/// The sending side of a `Subscribe` stream, bounded by bytes.
struct Budget {
    tx: mpsc::Sender<Budgeted>,
    bytes: Arc<Semaphore>,
}

impl Budget {
    /// Sends an error (it ends the stream).
    async fn fail(&self, status: Status) {
        let _ = self.tx.send((Err(status), None)).await;
    }

    /// Sends a message once its bytes fit the budget (a message larger than the whole
    /// budget waits for all of it). `false` when the reader is gone.
    async fn send(&self, message: proto::Message) -> bool {
        let size = message.body.len()
            + message.key.as_ref().map_or(0, String::len)
            + message
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let want = u32::try_from(size.clamp(1, SUBSCRIBE_BUFFER_BYTES)).unwrap_or(u32::MAX);
        let share = tokio::select! {
            share = Arc::clone(&self.bytes).acquire_many_owned(want) => share.ok(),
            _ = self.tx.closed() => return false,
        };
        let item = proto::SubscribeResponse {
            message: Some(message),
        };
        self.tx.send((Ok(item), share)).await.is_ok()
    }
}

/// Awaits `send` unless the broker stops first (`None`): a subscriber that stopped reading
/// must not hold up shutdown, which joins this task.
async fn unless_stopped<T>(
    broker: &Broker,
    send: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        sent = send => Some(sent),
        _ = broker.until_shutdown() => None,
    }
}

/// Streams a partition from `next` on, then follows new messages.
async fn follow(broker: Arc<Broker>, queue: String, partition: u32, mut next: u64, out: Budget) {
    loop {
        if broker.is_shutting_down() {
            // Never wait on a subscriber that stopped reading: shutdown joins this task.
            let _ = out.tx.try_send((
                Err(Status::unavailable("the broker is shutting down")),
                None,
            ));
            return;
        }
        let read = broker
            .read_current_log(&queue, partition, ReadFrom::Offset(next), SUBSCRIBE_BATCH)
            .await;
        let (batch, after) = match read {
            Ok(read) => read,
            Err(error) => {
                unless_stopped(&broker, out.fail(error.into())).await;
                return;
            }
        };
        if batch.is_empty() {
            if broker.holds_queue_data(&queue) {
                tokio::select! {
                    waited = broker.wait_for_offset(&queue, partition, next, Duration::from_secs(30)) => {
                        if let Err(error) = waited {
                            unless_stopped(&broker, out.fail(error.into())).await;
                            return;
                        }
                    }
                    _ = out.tx.closed() => return,
                }
            } else {
                // A cluster node without a replica of the queue hears of no new message:
                // it asks a replica again after a pause.
                tokio::select! {
                    () = tokio::time::sleep(REMOTE_POLL) => {}
                    _ = out.tx.closed() => return,
                }
            }
            continue;
        }
        for d in batch {
            if !unless_stopped(&broker, out.send(message(d)))
                .await
                .unwrap_or(false)
            {
                return;
            }
        }
        next = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{BrokerConfig, NewMessage, QueueSettings};
    use bytes::Bytes;

    /// Regression (issue 19, item 10): a `Subscribe` reader that takes nothing holds at
    /// most the byte budget of messages, not a count of them (three unread streams over
    /// 30 MB messages took 1.35 GB).
    #[tokio::test]
    async fn an_unread_subscription_buffers_at_most_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        })
        .await
        .unwrap();
        let settings = QueueSettings {
            max_message_bytes: 4 * 1024 * 1024,
            ..QueueSettings::default()
        };
        broker.create_queue("big", settings).await.unwrap();
        let body = Bytes::from(vec![7u8; 3 * 1024 * 1024]);
        for _ in 0..8 {
            let message = NewMessage {
                key: None,
                headers: Default::default(),
                content_type: None,
                body: body.clone(),
                idempotency_key: None,
            };
            broker.publish("big", vec![message]).await.unwrap();
        }
        let (tx, mut rx) = mpsc::channel(SUBSCRIBE_BATCH);
        let bytes = Arc::new(Semaphore::new(SUBSCRIBE_BUFFER_BYTES));
        let out = Budget {
            tx,
            bytes: Arc::clone(&bytes),
        };
        let task = tokio::spawn(follow(Arc::clone(&broker), "big".into(), 0, 0, out));
        // Wait until the follower is stuck on the budget (a failure guard, not a timing).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while bytes.available_permits() >= body.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "follower never filled its budget"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let queued = rx.len();
        assert!(
            queued * body.len() <= SUBSCRIBE_BUFFER_BYTES,
            "{queued} messages queued"
        );
        assert_eq!(queued, 2);
        // Taking one frees its share and lets the next one in.
        let (first, share) = rx.recv().await.unwrap();
        assert!(first.is_ok());
        drop(share);
        let (second, _share) = rx.recv().await.unwrap();
        assert!(second.is_ok());
        drop(rx);
        task.abort();
    }
}
