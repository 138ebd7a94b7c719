//! Issue 16: bad frames on the Kafka listener — wrong sizes, unknown API keys and versions,
//! truncated requests and batches, CRC errors, absurd counts, garbage — get an error
//! response or a closed connection, never a panic or a stuck broker; and an idempotent
//! producer's repeated batch is stored once. Raw TCP, with requests built by the
//! kafka-protocol crate.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, MetadataRequest, ProduceRequest, ProduceResponse, RequestHeader,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::TestServer;

/// A guard against a hang: every read must answer or close within this.
const ANSWER: Duration = Duration::from_secs(20);

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.kafka.as_deref().unwrap())
        .await
        .unwrap()
}

/// Writes a raw frame body (the size prefix is added).
async fn send(stream: &mut TcpStream, body: &[u8]) {
    let mut frame = BytesMut::new();
    frame.put_i32(body.len() as i32);
    frame.put_slice(body);
    stream.write_all(&frame).await.unwrap();
}

/// Reads one response frame, or `None` when the broker closed the connection.
async fn receive(stream: &mut TcpStream) -> Option<Bytes> {
    let read = async {
        let size = stream.read_i32().await.ok()?;
        let mut body = vec![0u8; usize::try_from(size).ok()?];
        stream.read_exact(&mut body).await.ok()?;
        Some(Bytes::from(body))
    };
    tokio::time::timeout(ANSWER, read)
        .await
        .expect("the broker answers or closes, never hangs")
}

fn request(api: ApiKey, version: i16, correlation: i32, body: &impl Encodable) -> BytesMut {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation)
        .with_client_id(Some(StrBytes::from_static_str("frames-test")))
        .encode(&mut buf, api.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    buf
}

/// ApiVersions v3 answers on this connection: it is still open and served.
async fn still_served(stream: &mut TcpStream) {
    send(
        stream,
        &request(ApiKey::ApiVersions, 3, 4242, &ApiVersionsRequest::default()),
    )
    .await;
    let mut answer = receive(stream).await.expect("an ApiVersions answer");
    assert_eq!(answer.get_i32(), 4242);
}

/// A fresh connection is served: the broker survived.
async fn broker_alive(server: &TestServer) {
    let mut stream = connect(server).await;
    still_served(&mut stream).await;
}

#[tokio::test]
async fn unknown_keys_and_versions_get_unsupported_version_and_the_connection_stays() {
    let server = TestServer::start().await;
    let mut stream = connect(&server).await;
    // Unknown key.
    send(&mut stream, &[0x27, 0x0f, 0, 0, 0, 0, 0, 7]).await;
    let answer = receive(&mut stream).await.unwrap();
    assert_eq!(&answer[..], &[0, 0, 0, 7, 0, 35]);
    // Known key, version not served (Produce v0).
    send(&mut stream, &[0, 0, 0, 0, 0, 0, 0, 8, 0xff, 0xff]).await;
    let answer = receive(&mut stream).await.unwrap();
    assert_eq!(&answer[..], &[0, 0, 0, 8, 0, 35]);
    // ApiVersions newer than served: the v0 answer with the list (KIP-511).
    send(&mut stream, &[0, 18, 0, 99, 0, 0, 0, 9]).await;
    let mut answer = receive(&mut stream).await.unwrap();
    assert_eq!(answer.get_i32(), 9);
    assert_eq!(answer.get_i16(), 35);
    assert!(answer.get_i32() > 10, "the served APIs are listed");
    still_served(&mut stream).await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_sizes_close_the_connection() {
    let server = TestServer::start().await;
    for size in [-1i32, 0, 7, i32::MAX] {
        let mut stream = connect(&server).await;
        stream.write_all(&size.to_be_bytes()).await.unwrap();
        stream.write_all(&[0u8; 16]).await.unwrap();
        assert!(receive(&mut stream).await.is_none(), "size {size}");
    }
    // A frame cut short then the client leaves.
    let mut stream = connect(&server).await;
    stream.write_all(&100i32.to_be_bytes()).await.unwrap();
    stream.write_all(&[0u8; 10]).await.unwrap();
    drop(stream);
    broker_alive(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn truncated_requests_and_absurd_counts_close_without_harm() {
    let server = TestServer::start().await;
    let full = request(ApiKey::Metadata, 4, 1, &MetadataRequest::default());
    for cut in [9, 11, full.len() - 1] {
        let mut stream = connect(&server).await;
        send(&mut stream, &full[..cut]).await;
        assert!(receive(&mut stream).await.is_none(), "cut at {cut}");
    }
    // Metadata v1 claiming 2^31 - 1 topics in four bytes.
    let mut body = BytesMut::new();
    body.put_slice(&[0, 3, 0, 1, 0, 0, 0, 5, 0xff, 0xff]);
    body.put_i32(i32::MAX);
    let mut stream = connect(&server).await;
    send(&mut stream, &body).await;
    assert!(receive(&mut stream).await.is_none());
    broker_alive(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_frames_never_stop_the_broker() {
    let server = TestServer::start().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    for round in 0..300 {
        let mut stream = connect(&server).await;
        let len = rng.random_range(8..200);
        let mut body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Half the rounds aim at served APIs, where the decoders are reached.
        if round % 2 == 0 {
            body[0] = 0;
            body[1] = rng.random_range(0..40);
            body[2] = 0;
            body[3] = rng.random_range(0..12);
        }
        send(&mut stream, &body).await;
        let _ = receive(&mut stream).await;
    }
    broker_alive(&server).await;
    server.stop().await;
}

fn batch(producer_id: i64, sequence: i32, values: &[&str]) -> Bytes {
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch: if producer_id < 0 { -1 } else { 0 },
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: if producer_id < 0 {
                -1
            } else {
                sequence + i as i32
            },
            timestamp: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, &records, &options).unwrap();
    buf.freeze()
}

/// Produces `records` to partition 0 of `topic`; returns (error code, base offset).
async fn produce(stream: &mut TcpStream, topic: &str, records: Bytes) -> (i16, i64) {
    let mut body = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5000);
    body.topic_data = vec![
        TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(vec![
                PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(records)),
            ]),
    ];
    send(stream, &request(ApiKey::Produce, 9, 3, &body)).await;
    let mut answer = receive(stream).await.expect("a produce answer");
    assert_eq!(answer.get_i32(), 3);
    let _tagged = answer.get_u8();
    let response = ProduceResponse::decode(&mut answer, 9).unwrap();
    let p = &response.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[tokio::test]
async fn bad_batches_get_errors_and_idempotent_repeats_are_stored_once() {
    let server = TestServer::start().await;
    server
        .broker
        .create_queue("frames", Default::default())
        .await
        .unwrap();
    let mut stream = connect(&server).await;
    let good = batch(-1, -1, &["a", "b"]);
    assert_eq!(produce(&mut stream, "frames", good.clone()).await, (0, 0));
    // CRC error: a flipped byte in the last record.
    let mut bad = BytesMut::from(&good[..]);
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    assert_eq!(produce(&mut stream, "frames", bad.freeze()).await.0, 2);
    // Truncated batch.
    assert_eq!(
        produce(&mut stream, "frames", good.slice(..good.len() - 3))
            .await
            .0,
        87
    );
    // A record count far beyond the bytes, with a valid CRC (the crate wrote one batch per
    // record here: the CRC covers the first batch only).
    let mut lying = BytesMut::from(&good[..]);
    lying[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
    let end = 12 + i32::from_be_bytes([lying[8], lying[9], lying[10], lying[11]]) as usize;
    let crc = crc32c::crc32c(&lying[21..end]);
    lying[17..21].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(produce(&mut stream, "frames", lying.freeze()).await.0, 87);
    // Idempotence: the same batch twice is one append with one offset.
    let first = produce(&mut stream, "frames", batch(77, 0, &["x", "y"])).await;
    assert_eq!(first, (0, 2));
    assert_eq!(
        produce(&mut stream, "frames", batch(77, 0, &["x", "y"])).await,
        (0, 2)
    );
    assert_eq!(
        produce(&mut stream, "frames", batch(77, 2, &["z"])).await,
        (0, 4)
    );
    // A gap in the sequence.
    assert_eq!(
        produce(&mut stream, "frames", batch(77, 9, &["gap"]))
            .await
            .0,
        45
    );
    let bounds = server.broker.partition_bounds("frames", 0).unwrap();
    assert_eq!(bounds.next, 5, "a, b, x, y, z: nothing else was stored");
    still_served(&mut stream).await;
    server.stop().await;
}

/// A Fetch at the end of the log waits (up to its `max_wait_ms`) and answers with the
/// record published meanwhile over the broker's own API: had the long-poll not woken, it
/// would answer empty at the end of its wait.
#[tokio::test]
async fn a_fetch_long_polls_until_a_record_arrives() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{FetchRequest, FetchResponse};
    let server = TestServer::start().await;
    server
        .broker
        .create_queue("waiting", Default::default())
        .await
        .unwrap();
    let mut stream = connect(&server).await;
    let mut body = FetchRequest::default()
        .with_max_wait_ms(30_000)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20);
    body.topics = vec![
        FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_static_str("waiting")))
            .with_partitions(vec![
                FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20),
            ]),
    ];
    send(&mut stream, &request(ApiKey::Fetch, 12, 5, &body)).await;
    // Publish once the broker holds the fetch parked (its waiters gauge says so).
    common::eventually("the fetch is parked", || async {
        common::metrics_text(&server.http)
            .await
            .lines()
            .any(|l| l == "qit_kafka_fetch_waiters 1")
    })
    .await;
    let broker = server.broker.clone();
    let publisher = tokio::spawn(async move {
        broker
            .publish(
                "waiting",
                vec![qit::broker::NewMessage {
                    body: Bytes::from_static(b"late"),
                    ..Default::default()
                }],
            )
            .await
            .unwrap();
    });
    let mut answer = receive(&mut stream).await.expect("a fetch answer");
    publisher.await.unwrap();
    assert_eq!(answer.get_i32(), 5);
    let _tagged = answer.get_u8();
    let response = FetchResponse::decode(&mut answer, 12).unwrap();
    let partition = &response.responses[0].partitions[0];
    assert_eq!(partition.error_code, 0);
    assert_eq!(partition.high_watermark, 1);
    let mut records = partition.records.clone().unwrap();
    let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut records).unwrap();
    assert_eq!(set.records[0].value.as_deref(), Some(&b"late"[..]));
    server.stop().await;
}

#[tokio::test]
async fn the_listener_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| {
        c.kafka = qit::config::KafkaListen(None);
    })
    .await;
    assert!(server.kafka.is_none());
    server.stop().await;
}
