//! The broker in-process: queue semantics over real logs and journals in a temp dir.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use qit::broker::{
    Binding, Broker, BrokerConfig, BrokerError, ExchangeKind, HeaderMatch, MessageId, NewMessage,
    Ordering, QueueSettings, ReadFrom, SeekTarget,
};
use qit::clock::Clock;
use qit::log::FsyncPolicy;

async fn open(dir: &Path) -> Arc<Broker> {
    open_with_clock(dir, Clock::system()).await
}

/// A broker reading "now" from `clock` (a manual clock moves only when a test says so).
async fn open_with_clock(dir: &Path, clock: Clock) -> Arc<Broker> {
    Broker::open(BrokerConfig {
        data_dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Always,
        max_queues: 100,
        clock,
        ..BrokerConfig::default()
    })
    .await
    .unwrap()
}

/// Polls `future` once: `Some` when it is done at once, `None` when it waits (it is then
/// parked, e.g. a long-poll registered as a waiter). Deterministic, unlike a sleep.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

fn msg(body: &str) -> NewMessage {
    NewMessage {
        body: Bytes::copy_from_slice(body.as_bytes()),
        content_type: Some("text/plain".into()),
        ..NewMessage::default()
    }
}

fn keyed(body: &str, key: &str) -> NewMessage {
    NewMessage {
        key: Some(key.into()),
        ..msg(body)
    }
}

const NOW: Duration = Duration::ZERO;

async fn recv(b: &Broker, q: &str, max: usize) -> Vec<qit::broker::Delivery> {
    b.receive(q, "default", max, NOW, None).await.unwrap()
}

fn bodies(deliveries: &[qit::broker::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8(d.body.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn publish_receive_ack_and_restart_keeps_acks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path()).await;
        let (_, created) = b
            .create_queue("jobs", QueueSettings::default())
            .await
            .unwrap();
        assert!(created);
        let (_, again) = b
            .create_queue("jobs", QueueSettings::default())
            .await
            .unwrap();
        assert!(!again, "same settings: idempotent");
        let other = QueueSettings {
            partitions: 2,
            ..QueueSettings::default()
        };
        assert!(matches!(
            b.create_queue("jobs", other).await,
            Err(BrokerError::QueueExists(_))
        ));
        assert!(
            b.queue_info("jobs.dlq").is_ok(),
            "DLQ created with the queue"
        );
        let ids = b
            .publish("jobs", vec![msg("a"), msg("b"), msg("c")])
            .await
            .unwrap();
        assert_eq!(ids[2].id.to_string(), "0-2");
        let got = recv(&b, "jobs", 2).await;
        assert_eq!(bodies(&got), vec!["a", "b"]);
        assert_eq!(got[0].delivery_count, 1);
        assert_eq!(got[0].content_type.as_deref(), Some("text/plain"));
        b.ack("jobs", "default", got[0].id).await.unwrap();
        b.ack("jobs", "default", got[0].id).await.unwrap();
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path()).await;
    // "a" was acked; "b" was leased but not acked: delivered again, count 2.
    let got = recv(&b, "jobs", 10).await;
    assert_eq!(bodies(&got), vec!["b", "c"]);
    assert_eq!(got[0].delivery_count, 2);
    assert_eq!(got[1].delivery_count, 1);
    let info = b.group_info("jobs", "default").unwrap();
    assert_eq!(info.partitions[0].committed_offset, 1);
    assert_eq!(info.in_flight, 2);
}

#[tokio::test]
async fn expiry_and_nack_redeliver_then_dead_letter_with_headers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_700_000_000_000);
    let b = open_with_clock(dir.path(), clock.clone()).await;
    let settings = QueueSettings {
        max_deliveries: 2,
        ..QueueSettings::default()
    };
    b.create_queue("work", settings).await.unwrap();
    b.publish("work", vec![msg("x")]).await.unwrap();
    let vis = Some(Duration::from_millis(100));
    let first = b.receive("work", "default", 1, NOW, vis).await.unwrap();
    assert_eq!(first[0].delivery_count, 1);
    assert!(
        recv(&b, "work", 1).await.is_empty(),
        "leased until it expires"
    );
    // Expiry: once the visibility timeout has passed, it is redelivered.
    clock.advance(Duration::from_millis(100));
    let second = b
        .receive("work", "default", 1, Duration::from_secs(5), vis)
        .await
        .unwrap();
    assert_eq!(second[0].delivery_count, 2);
    // Second delivery fails: dead-lettered.
    b.nack("work", "default", second[0].id, Some(Duration::ZERO))
        .await
        .unwrap();
    let dead = b
        .receive("work.dlq", "default", 1, Duration::from_secs(5), None)
        .await
        .unwrap();
    assert_eq!(bodies(&dead), vec!["x"]);
    let h = &dead[0].headers;
    assert_eq!(h["qit-original-queue"], "work");
    assert_eq!(h["qit-original-id"], "0-0");
    assert_eq!(h["qit-delivery-count"], "2");
    assert_eq!(h["qit-dead-letter-reason"], "nacked");
    b.nack("work.dlq", "default", dead[0].id, None)
        .await
        .unwrap();
    // Counted done for the group (the dead-letter worker records it after the DLQ append).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.group_info("work", "default").unwrap().dead_lettered != 1 {
        assert!(std::time::Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = b.group_info("work", "default").unwrap();
    assert_eq!((info.dead_lettered, info.backlog), (1, 0));
    // Redrive moves it back with a fresh delivery count.
    assert_eq!(b.redrive("work", None).await.unwrap(), 1);
    let back = recv(&b, "work", 1).await;
    assert_eq!(bodies(&back), vec!["x"]);
    assert_eq!(back[0].delivery_count, 1);
    assert!(!back[0].headers.contains_key("qit-original-queue"));
    assert!(recv(&b, "work.dlq", 1).await.is_empty());
}

/// A message larger than the default cap, accepted by a queue with a higher
/// `max_message_bytes`, still reaches the dead-letter queue made with it (it used to be
/// refused there, and the dead-letter worker retried it for ever).
#[tokio::test]
async fn a_large_message_is_dead_lettered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    let settings = QueueSettings {
        max_deliveries: 1,
        max_message_bytes: 4 * 1024 * 1024,
        ..QueueSettings::default()
    };
    b.create_queue("big", settings).await.unwrap();
    let body = "y".repeat(2 * 1024 * 1024);
    b.publish("big", vec![msg(&body)]).await.unwrap();
    let got = recv(&b, "big", 1).await;
    b.nack("big", "default", got[0].id, Some(Duration::ZERO))
        .await
        .unwrap();
    let dead = b
        .receive("big.dlq", "default", 1, Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(bodies(&dead), vec![body]);
    assert_eq!(
        b.queue_info("big.dlq").unwrap().settings.max_message_bytes,
        4 * 1024 * 1024
    );
}

/// A queue whose named dead-letter queue exists with a smaller `max_message_bytes` is
/// refused: a dead letter larger than that cap could never be moved there (the worker
/// offered it again for ever). Nothing is created, and the dead-letter queue is unchanged.
#[tokio::test]
async fn a_dead_letter_queue_with_a_smaller_message_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    let small = QueueSettings {
        max_message_bytes: 1024,
        ..QueueSettings::default()
    };
    b.create_queue("small-dlq", small).await.unwrap();
    let settings = QueueSettings {
        max_deliveries: 1,
        max_message_bytes: 4096,
        dead_letter: Some("small-dlq".into()),
        ..QueueSettings::default()
    };
    let refused = b.create_queue("large", settings.clone()).await;
    match refused {
        Err(BrokerError::InvalidSetting(s)) => {
            assert_eq!(s.field, "dead_letter");
            assert!(s.reason.contains("1024"), "{}", s.reason);
        }
        other => panic!("expected an invalid dead_letter, got {other:?}"),
    }
    assert!(b.queue_info("large").is_err(), "nothing created");
    // With a cap the dead-letter queue takes, it is made.
    let fitting = QueueSettings {
        max_message_bytes: 1024,
        ..settings
    };
    b.create_queue("large", fitting).await.unwrap();
}

#[tokio::test]
async fn nack_uses_backoff_and_delay() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_700_000_000_000);
    let b = open_with_clock(dir.path(), clock.clone()).await;
    let settings = QueueSettings {
        backoff: vec![3600],
        ..QueueSettings::default()
    };
    b.create_queue("slow", settings).await.unwrap();
    b.publish("slow", vec![msg("a")]).await.unwrap();
    let got = recv(&b, "slow", 1).await;
    b.nack("slow", "default", got[0].id, None).await.unwrap();
    assert!(recv(&b, "slow", 1).await.is_empty(), "backoff of an hour");
    assert!(matches!(
        b.nack("slow", "default", got[0].id, None).await,
        Err(BrokerError::NotLeased(_))
    ));
    clock.advance(Duration::from_secs(3599));
    assert!(recv(&b, "slow", 1).await.is_empty(), "a second early");
    clock.advance(Duration::from_secs(1));
    let again = recv(&b, "slow", 1).await;
    assert_eq!(
        (bodies(&again), again[0].delivery_count),
        (vec!["a".into()], 2)
    );
    b.ack("slow", "default", again[0].id).await.unwrap();
    b.publish("slow", vec![msg("b")]).await.unwrap();
    let got = recv(&b, "slow", 1).await;
    b.nack("slow", "default", got[0].id, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(bodies(&recv(&b, "slow", 1).await), vec!["b"]);
    assert!(matches!(
        b.ack(
            "slow",
            "default",
            MessageId {
                partition: 0,
                offset: 99
            }
        )
        .await,
        Err(BrokerError::MessageNotFound(_))
    ));
}

#[tokio::test]
async fn idempotency_keys_dedupe_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let b = open(dir.path()).await;
        b.create_queue("d", QueueSettings::default()).await.unwrap();
        let m = NewMessage {
            idempotency_key: Some("order-1".into()),
            ..msg("one")
        };
        let a = b.publish("d", vec![m.clone()]).await.unwrap();
        let again = b.publish("d", vec![m.clone(), m]).await.unwrap();
        assert_eq!(again[0].id, a[0].id);
        assert_eq!(again[1].id, a[0].id);
        b.shutdown().await.unwrap();
        a[0].id
    };
    let b = open(dir.path()).await;
    let m = NewMessage {
        idempotency_key: Some("order-1".into()),
        ..msg("one")
    };
    assert_eq!(b.publish("d", vec![m]).await.unwrap()[0].id, first);
    assert_eq!(b.queue_info("d").unwrap().partitions[0].next_offset, 1);
}

#[tokio::test]
async fn key_ordering_holds_one_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    let settings = QueueSettings {
        ordering: Ordering::Key,
        ..QueueSettings::default()
    };
    b.create_queue("fifo", settings).await.unwrap();
    b.publish(
        "fifo",
        vec![
            keyed("a1", "a"),
            keyed("a2", "a"),
            keyed("b1", "b"),
            keyed("a3", "a"),
        ],
    )
    .await
    .unwrap();
    let got = recv(&b, "fifo", 10).await;
    assert_eq!(bodies(&got), vec!["a1", "b1"]);
    b.ack("fifo", "default", got[0].id).await.unwrap();
    let got = recv(&b, "fifo", 10).await;
    assert_eq!(bodies(&got), vec!["a2"]);
}

#[tokio::test]
async fn max_in_flight_and_groups_are_pub_sub() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    let settings = QueueSettings {
        max_in_flight: 2,
        partitions: 3,
        ..QueueSettings::default()
    };
    b.create_queue("events", settings).await.unwrap();
    let batch: Vec<NewMessage> = (0..6).map(|i| msg(&i.to_string())).collect();
    b.publish("events", batch).await.unwrap();
    let mut first_leased: Vec<MessageId> =
        recv(&b, "events", 10).await.iter().map(|d| d.id).collect();
    assert_eq!(first_leased.len(), 2, "capped by max_in_flight");
    assert!(recv(&b, "events", 10).await.is_empty());
    let mut seen = Vec::new();
    for _ in 0..3 {
        for d in b.receive("events", "audit", 10, NOW, None).await.unwrap() {
            seen.push(String::from_utf8(d.body.to_vec()).unwrap());
            b.ack("events", "audit", d.id).await.unwrap();
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec!["0", "1", "2", "3", "4", "5"],
        "a second group sees all"
    );
    // A long-poll of the full group waits; an ack that frees a slot wakes it at once. Its
    // wait is 600 s; without the wake it is served by a re-check 30 s on, past the 20 s
    // guard (a guard, not a measure: the woken receive takes milliseconds).
    let held = b.receive("events", "default", 10, NOW, None).await.unwrap();
    assert!(held.is_empty(), "still full");
    let mut waiting = Box::pin(b.receive("events", "default", 1, Duration::from_secs(600), None));
    assert!(poll_once(&mut waiting).await.is_none(), "parked while full");
    let first = first_leased.pop().unwrap();
    b.ack("events", "default", first).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the ack woke the waiting receive")
        .unwrap();
    assert_eq!(woken.len(), 1);
    let info = b.queue_info("events").unwrap();
    assert_eq!(info.groups.len(), 2);
    assert!(matches!(
        b.group_info("events", "nope"),
        Err(BrokerError::GroupNotFound { .. })
    ));
}

#[tokio::test]
async fn seek_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    b.create_queue("s", QueueSettings::default()).await.unwrap();
    b.publish("s", (0..5).map(|i| msg(&i.to_string())).collect())
        .await
        .unwrap();
    b.seek(
        "s",
        "default",
        SeekTarget::Offset {
            partition: 0,
            offset: 3,
        },
    )
    .await
    .unwrap();
    assert_eq!(bodies(&recv(&b, "s", 10).await), vec!["3", "4"]);
    b.seek("s", "default", SeekTarget::Earliest).await.unwrap();
    assert_eq!(recv(&b, "s", 10).await.len(), 5);
    let info = b.seek("s", "default", SeekTarget::Latest).await.unwrap();
    assert_eq!(info.backlog, 0);
    let (replay, next) = b.read_log("s", 0, ReadFrom::Offset(1), 2).unwrap();
    assert_eq!(bodies(&replay), vec!["1", "2"]);
    assert_eq!(next, 3);
    assert_eq!(replay[0].delivery_count, 0);
    let (all, _) = b.read_log("s", 0, ReadFrom::Time(0), 100).unwrap();
    assert_eq!(all.len(), 5);
}

#[tokio::test]
async fn exchanges_route_by_kind_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path()).await;
        for q in ["q1", "q2"] {
            b.create_queue(q, QueueSettings::default()).await.unwrap();
        }
        assert!(
            b.create_exchange("logs", ExchangeKind::Topic)
                .await
                .unwrap()
        );
        assert!(
            !b.create_exchange("logs", ExchangeKind::Topic)
                .await
                .unwrap()
        );
        assert!(
            b.create_exchange("logs", ExchangeKind::Fanout)
                .await
                .is_err()
        );
        let bind = |queue: &str, key: &str| Binding {
            queue: queue.into(),
            key: Some(key.into()),
            headers: None,
            match_mode: None,
        };
        b.bind("logs", bind("q1", "app.*.error")).await.unwrap();
        b.bind("logs", bind("q2", "app.#")).await.unwrap();
        assert!(matches!(
            b.bind("logs", bind("missing", "x")).await,
            Err(BrokerError::QueueNotFound(_))
        ));
        b.create_exchange("h", ExchangeKind::Headers).await.unwrap();
        b.bind(
            "h",
            Binding {
                queue: "q1".into(),
                key: None,
                headers: Some(
                    [("kind".to_string(), "a".to_string())]
                        .into_iter()
                        .collect(),
                ),
                match_mode: Some(HeaderMatch::All),
            },
        )
        .await
        .unwrap();
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path()).await;
    let routed = b
        .publish_to_exchange("logs", Some("app.web.error"), msg("e"))
        .await
        .unwrap();
    let queues: Vec<&str> = routed.iter().map(|r| r.queue.as_str()).collect();
    assert_eq!(queues, vec!["q1", "q2"]);
    let routed = b
        .publish_to_exchange("logs", Some("app.web.info"), msg("i"))
        .await
        .unwrap();
    assert_eq!(routed.len(), 1);
    assert!(
        b.publish_to_exchange("logs", Some("other"), msg("o"))
            .await
            .unwrap()
            .is_empty()
    );
    let mut with_header = msg("h");
    with_header.headers = BTreeMap::from([("kind".to_string(), "a".to_string())]);
    assert_eq!(
        b.publish_to_exchange("h", None, with_header)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn long_poll_wakes_on_publish_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    b.create_queue("lp", QueueSettings::default())
        .await
        .unwrap();
    // Each receive is polled once first: then it is parked as a waiter for sure, where a
    // sleep would only make that likely.
    let mut waiter = {
        let b = Arc::clone(&b);
        Box::pin(async move {
            b.receive("lp", "default", 1, Duration::from_secs(30), None)
                .await
                .unwrap()
        })
    };
    assert!(
        poll_once(&mut waiter).await.is_none(),
        "nothing to receive yet"
    );
    let waiter = tokio::spawn(waiter);
    b.publish("lp", vec![msg("ping")]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bodies(&got), vec!["ping"]);
    let mut idle = {
        let b = Arc::clone(&b);
        Box::pin(async move {
            b.receive("lp", "default", 1, Duration::from_secs(30), None)
                .await
        })
    };
    assert!(poll_once(&mut idle).await.is_none(), "the long-poll waits");
    let idle = tokio::spawn(idle);
    b.shutdown().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), idle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(answer.is_empty());
    assert!(matches!(
        b.publish("lp", vec![msg("late")]).await,
        Err(BrokerError::ShuttingDown)
    ));
}

/// Cutting a group journal at every byte of its last entry never fails the reopen and
/// never loses an ack that came before that entry.
#[tokio::test]
async fn journal_cut_at_every_byte_of_last_entry() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path()).await;
        b.create_queue("j", QueueSettings::default()).await.unwrap();
        b.publish("j", vec![msg("a"), msg("b"), msg("c")])
            .await
            .unwrap();
        let got = recv(&b, "j", 3).await;
        b.ack("j", "default", got[0].id).await.unwrap();
        b.ack("j", "default", got[1].id).await.unwrap();
        b.shutdown().await.unwrap();
    }
    let journal = dir.path().join("queues/j/groups/default.journal");
    let whole = std::fs::read(&journal).unwrap();
    // The last entry is the ack of "b": 9 bytes of frame header + 17 bytes of event.
    let last = 9 + 17;
    for cut in whole.len() - last..whole.len() {
        std::fs::write(&journal, &whole[..cut]).unwrap();
        let b = open(dir.path()).await;
        let got = recv(&b, "j", 3).await;
        assert_eq!(bodies(&got), vec!["b", "c"], "cut at {cut}");
        b.shutdown().await.unwrap();
        drop(b);
        std::fs::write(&journal, &whole).unwrap();
    }
}

/// A record append with a batch key (an idempotent Kafka producer's batch on a cluster
/// node) is stored once within the dedup window, also after a restart (the window is read
/// back from the log), and the key does not show in what readers get.
#[tokio::test]
async fn a_keyed_record_append_is_stored_once_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let record = |value: &str| qit::log::Record {
        timestamp_ms: Clock::system().now_ms(),
        key: None,
        headers: vec![("h".to_string(), Bytes::from_static(b"v"))],
        value: Bytes::copy_from_slice(value.as_bytes()),
    };
    let key = || Some("kafka:7:0:0:0-1".to_string());
    {
        let b = open(dir.path()).await;
        b.create_queue("k", QueueSettings::default()).await.unwrap();
        let first = b
            .append_records_once("k", 0, vec![record("a"), record("b")], key())
            .await
            .unwrap();
        assert_eq!(first, 0);
        let again = b
            .append_records_once("k", 0, vec![record("a"), record("b")], key())
            .await
            .unwrap();
        assert_eq!(again, 0, "the retried batch answers its first offset");
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path()).await;
    let after = b
        .append_records_once("k", 0, vec![record("a"), record("b")], key())
        .await
        .unwrap();
    assert_eq!(after, 0, "the window is read back from the log");
    let other = Some("kafka:7:0:0:2-2".to_string());
    assert_eq!(
        b.append_records_once("k", 0, vec![record("c")], other)
            .await
            .unwrap(),
        2
    );
    assert_eq!(b.partition_bounds("k", 0).unwrap().next, 3);
    let (read, _) = b.read_log("k", 0, ReadFrom::Offset(0), 10).unwrap();
    assert_eq!(bodies(&read), ["a", "b", "c"]);
    assert!(read.iter().all(|d| d.headers.keys().eq(["h"])), "{read:?}");
    b.shutdown().await.unwrap();
}

/// `publish_many` on a single node answers each request on its own: its own offsets, or
/// its own error, in the order of the requests; a bad request stores nothing.
#[tokio::test]
async fn publish_many_answers_request_by_request() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    let settings = QueueSettings {
        max_message_bytes: 1024,
        ..QueueSettings::default()
    };
    b.create_queue("many", settings).await.unwrap();
    let big = "x".repeat(2048);
    let answers = b
        .publish_many(
            "many",
            vec![
                vec![msg("a"), msg("b")],
                vec![msg("c"), msg(&big)],
                vec![],
                vec![msg("d")],
            ],
        )
        .await;
    assert_eq!(answers.len(), 4);
    let offsets = |i: usize| -> Vec<String> {
        answers[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i}: {e}"))
            .iter()
            .map(|p| p.id.to_string())
            .collect()
    };
    assert_eq!(offsets(0), ["0-0", "0-1"]);
    assert!(
        matches!(answers[1], Err(BrokerError::MessageTooLarge { .. })),
        "{:?}",
        answers[1].as_ref().err()
    );
    assert!(
        matches!(answers[2], Err(BrokerError::InvalidArgument(_))),
        "{:?}",
        answers[2].as_ref().err()
    );
    assert_eq!(offsets(3), ["0-2"]);
    assert_eq!(bodies(&recv(&b, "many", 10).await), ["a", "b", "d"]);
    assert!(
        matches!(
            b.publish_many("missing", vec![vec![msg("e")]]).await[..],
            [Err(BrokerError::QueueNotFound(_))]
        ),
        "an unknown queue"
    );
}

/// Deleting a queue forgets its owner and grants in the same step (on a cluster, the same
/// entry): a grant never outlives its queue into one made again under the same name.
#[tokio::test]
async fn deleting_a_queue_forgets_its_grants_with_it() {
    use qit::auth::{AuthConfig, AuthStore, Permission, Resource};
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path()).await;
    let store = Arc::new(AuthStore::open(dir.path(), AuthConfig::default()).unwrap());
    broker.set_auth(Arc::clone(&store));
    for user in ["alice", "bob"] {
        let record = store.new_user(user, "a-long-enough-password").unwrap();
        broker.create_user(user, record).await.unwrap();
    }
    broker
        .create_queue("granted", QueueSettings::default())
        .await
        .unwrap();
    let queue = Resource::queue("granted");
    broker.set_owner(&queue, "alice").await.unwrap();
    broker
        .grant("alice", &queue, "bob", &[Permission::Publish])
        .await
        .unwrap();
    assert_eq!(store.permissions(&queue, "bob"), vec![Permission::Publish]);
    broker.delete_queue("granted").await.unwrap();
    assert!(store.permissions(&queue, "bob").is_empty());
    broker
        .create_queue("granted", QueueSettings::default())
        .await
        .unwrap();
    assert!(store.permissions(&queue, "bob").is_empty());
}

/// Recovery that cuts a torn tail the group had already acked (the log lost it, the
/// journal did not) makes the group forget those offsets, and for good: the messages
/// stored there next are delivered, also after another restart.
#[tokio::test]
async fn a_group_forgets_acks_past_a_cut_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = open(dir.path()).await;
        b.create_queue("tq", QueueSettings::default())
            .await
            .unwrap();
        for body in ["m0", "m1", "m2", "m3", "m4"] {
            b.publish("tq", vec![msg(body)]).await.unwrap();
        }
        for d in recv(&b, "tq", 10).await {
            b.ack("tq", "default", d.id).await.unwrap();
        }
        assert_eq!(
            b.group_info("tq", "default").unwrap().partitions[0].committed_offset,
            5
        );
        b.shutdown().await.unwrap();
    }
    let segment = dir.path().join("queues/tq/0/00000000000000000000.log");
    let len = std::fs::metadata(&segment).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(len - 5).unwrap();
    drop(file);
    {
        let b = open(dir.path()).await;
        assert_eq!(b.queue_info("tq").unwrap().partitions[0].next_offset, 4);
        let info = b.group_info("tq", "default").unwrap();
        assert_eq!(info.partitions[0].committed_offset, 4);
        let ids = b.publish("tq", vec![msg("new")]).await.unwrap();
        assert_eq!(ids[0].id.to_string(), "0-4");
        let got = recv(&b, "tq", 10).await;
        assert_eq!(bodies(&got), vec!["new"]);
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path()).await;
    let got = recv(&b, "tq", 10).await;
    assert_eq!(
        bodies(&got),
        vec!["new"],
        "the old ack of 0-4 stays forgotten"
    );
    assert_eq!(got[0].delivery_count, 2);
}

/// A delivery that a restart ended counts as failed: with `max_deliveries` used up, the
/// message goes to the dead-letter queue (reason `expired`) instead of being delivered
/// again and again, one restart after another.
#[tokio::test]
async fn a_restart_does_not_outrun_max_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let settings = QueueSettings {
        max_deliveries: 2,
        ..QueueSettings::default()
    };
    {
        let b = open(dir.path()).await;
        b.create_queue("md", settings).await.unwrap();
        b.publish("md", vec![msg("poison"), msg("fine")])
            .await
            .unwrap();
        let got = recv(&b, "md", 10).await;
        assert_eq!(bodies(&got), vec!["poison", "fine"]);
        b.ack("md", "default", got[1].id).await.unwrap();
        b.shutdown().await.unwrap();
    }
    {
        let b = open(dir.path()).await;
        let got = recv(&b, "md", 10).await;
        assert_eq!(bodies(&got), vec!["poison"]);
        assert_eq!(got[0].delivery_count, 2, "one delivery left");
        b.shutdown().await.unwrap();
    }
    let b = open(dir.path()).await;
    let dead = b
        .receive("md.dlq", "default", 1, Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(bodies(&dead), vec!["poison"]);
    assert_eq!(dead[0].headers["qit-delivery-count"], "2");
    assert_eq!(dead[0].headers["qit-dead-letter-reason"], "expired");
    assert!(
        recv(&b, "md", 10).await.is_empty(),
        "not delivered a third time"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.group_info("md", "default").unwrap().dead_lettered != 1 {
        assert!(std::time::Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = b.group_info("md", "default").unwrap();
    assert_eq!((info.backlog, info.in_flight), (0, 0));
    b.shutdown().await.unwrap();
    let b = open(dir.path()).await;
    assert!(recv(&b, "md", 10).await.is_empty(), "done for good");
}

/// Deleting a group: refused while it has a lease in flight, then gone for good (also
/// after a restart), no longer counted against the queue's group limit; a receive that
/// waited under its name gets a new group, which starts at the earliest message.
#[tokio::test]
async fn a_deleted_group_is_gone_and_its_name_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let config = |dir: &Path| BrokerConfig {
        data_dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Always,
        max_queues: 100,
        max_groups_per_queue: 3,
        ..BrokerConfig::default()
    };
    {
        let b = Broker::open(config(dir.path())).await.unwrap();
        b.create_queue("q", QueueSettings::default()).await.unwrap();
        b.publish("q", vec![msg("0"), msg("1")]).await.unwrap();
        let leased = b.receive("q", "audit", 1, NOW, None).await.unwrap();
        b.receive("q", "fill", 1, NOW, None).await.unwrap();
        assert!(
            matches!(
                b.receive("q", "other", 1, NOW, None).await,
                Err(BrokerError::LimitReached(_))
            ),
            "default, audit and fill fill the limit of 3"
        );
        match b.delete_group("q", "audit").await {
            Err(BrokerError::GroupInUse { in_flight: 1, .. }) => {}
            other => panic!("a group with a lease in flight is kept: {other:?}"),
        }
        b.ack("q", "audit", leased[0].id).await.unwrap();
        b.delete_group("q", "audit").await.unwrap();
        for gone in [
            b.group_info("q", "audit").map(|_| ()),
            b.delete_group("q", "audit").await,
            b.delete_group("q", "never").await,
        ] {
            assert!(
                matches!(gone, Err(BrokerError::GroupNotFound { .. })),
                "{gone:?}"
            );
        }
        assert!(matches!(
            b.delete_group("nope", "audit").await,
            Err(BrokerError::QueueNotFound(_))
        ));
        assert_eq!(
            bodies(&b.receive("q", "other", 5, NOW, None).await.unwrap()),
            vec!["0", "1"],
            "the freed slot takes a new group"
        );

        // A receive waiting under a name whose group is deleted gets the new group.
        b.create_queue("lp", QueueSettings::default())
            .await
            .unwrap();
        let mut waiting = {
            let b = Arc::clone(&b);
            Box::pin(async move {
                b.receive("lp", "late", 1, Duration::from_secs(30), None)
                    .await
                    .unwrap()
            })
        };
        assert!(poll_once(&mut waiting).await.is_none(), "parked");
        b.delete_group("lp", "late").await.unwrap();
        let waiting = tokio::spawn(waiting);
        b.publish("lp", vec![msg("wake")]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the publish woke the receive")
            .unwrap();
        assert_eq!(bodies(&got), vec!["wake"]);
        assert_eq!(
            b.group_info("lp", "late").unwrap().in_flight,
            1,
            "the lease is the new group's"
        );
        b.shutdown().await.unwrap();
    }
    let b = Broker::open(config(dir.path())).await.unwrap();
    assert!(matches!(
        b.group_info("q", "audit"),
        Err(BrokerError::GroupNotFound { .. })
    ));
    assert!(b.group_info("q", "other").is_ok(), "the others stay");
}

/// A replicator that runs every op on the broker itself, as a cluster leader whose
/// followers always agree would, except that it holds back the entries of one kind until
/// told (a slow Raft round): delivery counts, or a group delete (after the leader's checks).
struct HeldOps {
    broker: std::sync::OnceLock<std::sync::Weak<Broker>>,
    /// Hold group deletes (else delivery counts).
    deletes: bool,
    /// A held op waits for a permit.
    release: tokio::sync::Semaphore,
    /// Told when a held op starts waiting, and when it is applied.
    events: tokio::sync::mpsc::UnboundedSender<&'static str>,
}

impl HeldOps {
    /// A broker at `dir` holding `queue` with messages `bodies`, and its replicator, which
    /// holds back group deletes (`deletes`) or delivery counts (not the empty entry that makes
    /// a group); and the replicator's events.
    async fn install(
        dir: &Path,
        queue: &str,
        bodies: &[&str],
        deletes: bool,
    ) -> (
        Arc<Broker>,
        Arc<Self>,
        tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    ) {
        let b = open(dir).await;
        b.create_queue(queue, QueueSettings::default())
            .await
            .unwrap();
        b.publish(queue, bodies.iter().map(|body| msg(body)).collect())
            .await
            .unwrap();
        let (events, told) = tokio::sync::mpsc::unbounded_channel();
        let replicator = Arc::new(Self {
            broker: std::sync::OnceLock::new(),
            deletes,
            release: tokio::sync::Semaphore::new(0),
            events,
        });
        replicator.broker.set(Arc::downgrade(&b)).unwrap();
        b.set_replicator(replicator.clone());
        (b, replicator, told)
    }

    async fn held(
        &self,
        broker: &Broker,
        op: qit::broker::replicate::Op,
    ) -> Result<qit::broker::replicate::OpResult, BrokerError> {
        let _ = self.events.send("parked");
        self.release.acquire().await.unwrap().forget();
        let applied = broker.apply_op(op).await;
        let _ = self.events.send("applied");
        applied
    }
}

impl qit::broker::replicate::Replicator for HeldOps {
    fn submit(
        &self,
        op: qit::broker::replicate::Op,
    ) -> futures_util::future::BoxFuture<'_, Result<qit::broker::replicate::OpResult, BrokerError>>
    {
        use qit::broker::replicate::Op;
        Box::pin(async move {
            let broker = self.broker.get().and_then(|b| b.upgrade()).unwrap();
            match op {
                // A group's first receive makes it with an entry of no counts: not held.
                Op::DeliveryCounts { ref counts, .. } if !self.deletes && !counts.is_empty() => {
                    self.held(&broker, op).await
                }
                // As the cluster's leader proposes a group delete.
                Op::DeleteGroup {
                    ref queue,
                    ref group,
                } => {
                    let (queue, group) = (queue.clone(), group.clone());
                    let entry = async {
                        if self.deletes {
                            self.held(&broker, op).await
                        } else {
                            broker.apply_op(op).await
                        }
                    };
                    broker.propose_group_delete(&queue, &group, entry).await
                }
                op => broker.apply_op(op).await,
            }
        })
    }
}

/// A group deleted while the delivery count of its last receive is still on its way to
/// the replicas stays deleted: the counts entry is committed before the delete (applied
/// after it, it would make the group again on every replica, and the deleted group would
/// be listed again).
#[tokio::test]
async fn a_group_deleted_while_its_delivery_counts_replicate_stays_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (b, replicator, mut told) = HeldOps::install(dir.path(), "q", &["a"], false).await;

    let got = b.receive("q", "g", 1, NOW, None).await.unwrap();
    assert_eq!(got.len(), 1);
    // The count of that delivery is on its way, held back.
    assert_eq!(told.recv().await, Some("parked"));
    b.ack("q", "g", got[0].id).await.unwrap();
    // The delete waits for the counts (or, without the gate, is done at once).
    let mut delete = Box::pin(b.delete_group("q", "g"));
    let done_at_once = poll_once(&mut delete).await;
    replicator.release.add_permits(1);
    assert_eq!(told.recv().await, Some("applied"));
    match done_at_once {
        Some(result) => result.unwrap(),
        None => delete.await.unwrap(),
    }
    match b.group_info("q", "g") {
        Err(BrokerError::GroupNotFound { .. }) => {}
        other => panic!("the deleted group is back: {other:?}"),
    }
    // No other counts of the group followed.
    assert!(told.try_recv().is_err());
}

/// A receive while a group's delete is on its way gets nothing of that group (a lease
/// granted then would be dropped with the group, its consumer unable to ack it); once
/// the delete is through, the name is a new group that starts at the earliest message.
#[tokio::test]
async fn a_group_being_deleted_grants_no_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (b, replicator, mut told) = HeldOps::install(dir.path(), "q", &["a", "b"], true).await;
    let first = b.receive("q", "g", 1, NOW, None).await.unwrap();
    b.ack("q", "g", first[0].id).await.unwrap();

    let delete = tokio::spawn({
        let b = b.clone();
        async move { b.delete_group("q", "g").await }
    });
    // Checked idle and proposed; the entry is held back.
    assert_eq!(told.recv().await, Some("parked"));
    let meanwhile = b.receive("q", "g", 10, NOW, None).await.unwrap();
    assert!(
        meanwhile.is_empty(),
        "leased from a group being deleted: {meanwhile:?}"
    );
    replicator.release.add_permits(1);
    assert_eq!(told.recv().await, Some("applied"));
    delete.await.unwrap().unwrap();
    let again = b.receive("q", "g", 10, NOW, None).await.unwrap();
    let bodies: Vec<&[u8]> = again.iter().map(|d| d.body.as_ref()).collect();
    assert_eq!(bodies, [b"a".as_slice(), b"b".as_slice()]);
    assert!(again.iter().all(|d| d.delivery_count == 1), "{again:?}");
}

/// A delete that does not go through (no leader, say) leaves the group as it was: it
/// leases again.
#[tokio::test]
async fn a_group_whose_delete_failed_leases_again() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _replicator, _told) = HeldOps::install(dir.path(), "q", &["a", "b"], true).await;
    let first = b.receive("q", "g", 1, NOW, None).await.unwrap();
    b.ack("q", "g", first[0].id).await.unwrap();
    let failed = b
        .propose_group_delete("q", "g", async {
            Err::<(), _>(BrokerError::NoLeader("test".into()))
        })
        .await;
    assert!(
        matches!(failed, Err(BrokerError::NoLeader(_))),
        "{failed:?}"
    );
    let got = b.receive("q", "g", 1, NOW, None).await.unwrap();
    assert_eq!(got.len(), 1, "the group leases again");
    assert_eq!(got[0].body.as_ref(), b"b");
}

/// A replicator that runs every op on the broker itself (a cluster leader whose followers
/// always agree) and tells the kind of each op it is given, in order.
struct RecordedOps {
    broker: std::sync::OnceLock<std::sync::Weak<Broker>>,
    kinds: tokio::sync::mpsc::UnboundedSender<String>,
}

impl qit::broker::replicate::Replicator for RecordedOps {
    fn submit(
        &self,
        op: qit::broker::replicate::Op,
    ) -> futures_util::future::BoxFuture<'_, Result<qit::broker::replicate::OpResult, BrokerError>>
    {
        Box::pin(async move {
            let debug = format!("{op:?}");
            let kind = debug.split([' ', '{', '(']).next().unwrap_or_default();
            let _ = self.kinds.send(kind.to_string());
            let broker = self.broker.get().and_then(|b| b.upgrade()).unwrap();
            broker.apply_op(op).await
        })
    }
}

/// A consumer that went away hands its leases back with one op, followed by one entry of
/// delivery counts for all of them (a stream's end used to nack them one at a time: on a
/// cluster a call to the leader and a quorum round each). They are delivered again at once.
#[tokio::test]
async fn released_leases_come_back_with_one_op_and_one_count_entry() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    b.create_queue("q", QueueSettings::default()).await.unwrap();
    b.publish("q", vec![msg("a"), msg("b"), msg("c")])
        .await
        .unwrap();
    let (kinds, mut told) = tokio::sync::mpsc::unbounded_channel();
    let replicator = Arc::new(RecordedOps {
        broker: std::sync::OnceLock::new(),
        kinds,
    });
    replicator.broker.set(Arc::downgrade(&b)).unwrap();
    b.set_replicator(replicator.clone());

    let got = b.receive("q", "g", 3, NOW, None).await.unwrap();
    assert_eq!(got.len(), 3);
    // The receive's own counts go in the background: wait for them first.
    assert_eq!(told.recv().await.as_deref(), Some("Receive"));
    assert_eq!(told.recv().await.as_deref(), Some("DeliveryCounts"));
    let ids: Vec<MessageId> = got.iter().map(|d| d.id).collect();
    b.release("q", "g", &ids).await.unwrap();
    assert_eq!(told.recv().await.as_deref(), Some("Release"));
    assert_eq!(told.recv().await.as_deref(), Some("DeliveryCounts"));
    assert!(told.try_recv().is_err(), "one op and one counts entry");

    let again = b.receive("q", "g", 10, NOW, None).await.unwrap();
    assert_eq!(bodies(&again), vec!["a", "b", "c"]);
    assert!(again.iter().all(|d| d.delivery_count == 2), "{again:?}");
    // Releasing a message that is no longer leased (acked) changes nothing.
    b.ack("q", "g", again[0].id).await.unwrap();
    b.release("q", "g", &[again[0].id]).await.unwrap();
    assert!(b.receive("q", "g", 10, NOW, None).await.unwrap().is_empty());
    assert_eq!(b.group_info("q", "g").unwrap().in_flight, 2);
}

/// The publish latency histogram counts each publish once, on the node that answered it,
/// replication included: a replica applying a committed publish (or a Kafka append)
/// serves no one and records nothing, while its published counter still counts what it
/// stores. (Recording at apply counted one sample per Raft entry, on every replica, and
/// left out the replication round that the publisher waits for.)
#[tokio::test]
async fn publish_latency_counts_publishes_answered_here_not_entries_applied() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path()).await;
    b.create_queue("q", QueueSettings::default()).await.unwrap();
    let (kinds, _told) = tokio::sync::mpsc::unbounded_channel();
    let replicator = Arc::new(RecordedOps {
        broker: std::sync::OnceLock::new(),
        kinds,
    });
    replicator.broker.set(Arc::downgrade(&b)).unwrap();
    b.set_replicator(replicator.clone());
    let scrape = |b: &Broker| {
        let mut series = qit::metrics::ScrapeSeries::default();
        b.owned_series(&mut series);
        series.render()
    };
    let record = |value: &str| qit::log::Record {
        timestamp_ms: Clock::system().now_ms(),
        key: None,
        headers: Vec::new(),
        value: Bytes::copy_from_slice(value.as_bytes()),
    };

    // Served here: two publishes, two pipelined ones, one record append.
    b.publish("q", vec![msg("a")]).await.unwrap();
    b.publish("q", vec![msg("b"), msg("c")]).await.unwrap();
    let many = b
        .publish_many("q", vec![vec![msg("d")], vec![msg("e")]])
        .await;
    assert!(many.iter().all(Result::is_ok), "{many:?}");
    b.append_records("q", 0, vec![record("f")]).await.unwrap();
    let text = scrape(&b);
    for expected in [
        r#"qit_publish_latency_seconds_count{queue="q"} 5"#,
        r#"qit_messages_published_total{queue="q"} 6"#,
    ] {
        assert!(text.contains(expected), "no {expected} in {text}");
    }

    // Applied as a replica: stored and counted as published, not as publishes served.
    b.apply_op(qit::broker::replicate::Op::Publish {
        queue: "q".into(),
        messages: vec![msg("g").into()],
        now_ms: Clock::system().now_ms(),
    })
    .await
    .unwrap();
    b.apply_op(qit::broker::replicate::Op::AppendRecords {
        queue: "q".into(),
        partition: 0,
        records: vec![record("h").into()],
        batch_key: None,
        now_ms: Clock::system().now_ms(),
    })
    .await
    .unwrap();
    let text = scrape(&b);
    for expected in [
        r#"qit_publish_latency_seconds_count{queue="q"} 5"#,
        r#"qit_messages_published_total{queue="q"} 8"#,
    ] {
        assert!(text.contains(expected), "no {expected} in {text}");
    }
}
