"""Real Kafka clients (kafka-python, confluent-kafka/librdkafka) against a running qit.

Run by tests/kafka_clients.rs: `python clients.py SCENARIO BOOTSTRAP HTTP_URL [ARGS...]`.
Each scenario asserts what a Kafka user expects and exits non-zero (with the reason on
stderr) when qit does otherwise. Every wait is on a condition, bounded by a deadline that
only guards against a hang.
"""

import json
import sys
import time
import urllib.error
import urllib.request

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

DEADLINE_S = 90


def http(method, url, body=None, headers=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as e:
        return e.code, None


def until(what, check):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def create_topic(bootstrap, name, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)


def produce_all(producer, topic, messages):
    """messages: list of dicts with value, key, headers, timestamp?; returns (partition, offset) list."""
    errors, delivered = [], []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            delivered.append((msg.partition(), msg.offset()))

    for m in messages:
        while True:
            try:
                producer.produce(topic, value=m["value"], key=m.get("key"), headers=m.get("headers"),
                                 timestamp=m.get("timestamp", 0), on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    left = producer.flush(60)
    assert left == 0, f"{left} messages not delivered"
    assert not errors, f"delivery errors: {errors[:5]}"
    return delivered


def poll_until(consumers, want, seen):
    """Polls the consumers in turn until `want` distinct (partition, offset) pairs are seen."""
    deadline = time.monotonic() + DEADLINE_S
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only {len(seen)} of {want} messages consumed"
        for name, consumer in consumers.items():
            msg = consumer.poll(0.05)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consumer {name}: {msg.error()}")
            seen[(msg.partition(), msg.offset())] = (name, msg)


def group_floors(http_url, topic, group):
    status, info = http("GET", f"{http_url}/queues/{topic}/groups/{group}")
    assert status == 200, f"group info: {status}"
    return {p["partition"]: p["committed_offset"] for p in info["partitions"]}


def delete_group_error(admin, group):
    """Deletes `group` with confluent-kafka's admin client; the Kafka error code, or None."""
    try:
        admin.delete_consumer_groups([group], request_timeout=30)[group].result(30)
        return None
    except Exception as e:  # confluent_kafka raises KafkaException(KafkaError)
        if e.args and hasattr(e.args[0], "code"):
            return e.args[0].code()
        raise


def scenario_group(bootstrap, http_url):
    """10,000 keyed messages with headers; a group of two; commit; a restarted consumer
    continues from the commit."""
    topic, group, n = "orders", "billing", 10_000
    create_topic(bootstrap, topic, 2)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    messages = [{"value": f"value-{i}".encode(), "key": f"key-{i}".encode(),
                 "headers": [("index", str(i).encode()), ("kind", b"order")]} for i in range(n)]
    delivered = produce_all(producer, topic, messages)
    assert len(set(delivered)) == n, "every message has its own offset"

    def consumer():
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                      "auto.offset.reset": "earliest", "enable.auto.commit": False,
                      "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
        c.subscribe([topic])
        return c

    consumers = {"a": consumer(), "b": consumer()}
    seen = {}
    poll_until(consumers, n, seen)
    by = {name: sum(1 for who, _ in seen.values() if who == name) for name in consumers}
    # Both members took part once the group settled: each holds one partition now.
    until("both consumers hold a partition", lambda: all(
        (c.poll(0.05), len(c.assignment()) == 1)[1] for c in consumers.values()))
    for (p, o), (_, msg) in list(seen.items())[:200]:
        i = int(dict(msg.headers())["index"])
        assert msg.key() == f"key-{i}".encode() and msg.value() == f"value-{i}".encode()
    for c in consumers.values():
        c.commit(asynchronous=False)
    ends = {p: 0 for p in range(2)}
    for p, o in seen:
        ends[p] = max(ends[p], o + 1)
    until("the commits show as the qit group's floors",
          lambda: group_floors(http_url, topic, group) == ends)
    for c in consumers.values():
        c.close()
    more = [{"value": f"after-{i}".encode(), "key": f"k{i}".encode()} for i in range(100)]
    produce_all(producer, topic, more)
    restarted = {"c": consumer()}
    seen_after = {}
    poll_until(restarted, 100, seen_after)
    assert all(o >= ends[p] for p, o in seen_after), "a restarted consumer starts at the commit"
    assert all(m.value().startswith(b"after-") for _, m in seen_after.values())
    restarted["c"].close()
    print(json.dumps({"consumed": len(seen), "per_consumer": by, "after_restart": len(seen_after)}))


def scenario_timestamps(bootstrap, http_url):
    """Seek by timestamp (kafka-python), and the producer's timestamps kept over HTTP."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as KTP
    topic = "events"
    base = int(time.time() * 1000) - 3_600_000
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(10):
        producer.send(topic, value=f"e{i}".encode(), key=b"k", timestamp_ms=base + i * 1000).get(timeout=30)
    producer.close()
    status, log = http("GET", f"{http_url}/queues/{topic}/log?partition=0&from=0&max=100")
    assert status == 200
    assert [m["timestamp"] for m in log["messages"]] == [base + i * 1000 for i in range(10)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = KTP(topic, 0)
    consumer.assign([tp])
    found = consumer.offsets_for_times({tp: base + 4500})[tp]
    assert found is not None and found.offset == 5 and found.timestamp == base + 5000, found
    assert consumer.offsets_for_times({tp: base + 99_000})[tp] is None
    assert consumer.beginning_offsets([tp])[tp] == 0 and consumer.end_offsets([tp])[tp] == 10
    consumer.seek(tp, found.offset)
    got = []
    until("the records from the timestamp on arrive", lambda: (
        got.extend(r for rs in consumer.poll(timeout_ms=100).values() for r in rs), len(got) >= 5)[1])
    assert [r.value for r in got] == [f"e{i}".encode() for i in range(5, 10)], got
    assert [r.timestamp for r in got] == [base + i * 1000 for i in range(5, 10)]
    consumer.close()
    print(json.dumps({"offset_for_time": found.offset}))


def scenario_compression(bootstrap, http_url):
    """Batches compressed by librdkafka (gzip, snappy, lz4, zstd) and kafka-python (gzip)."""
    from kafka import KafkaProducer
    topic = "packed"
    expected = []
    for codec in ["gzip", "snappy", "lz4", "zstd"]:
        producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                             "linger.ms": 20})
        batch = [{"value": (f"{codec}-{i}-" + "x" * 200).encode(), "key": codec.encode()}
                 for i in range(300)]
        produce_all(producer, topic, batch)
        expected += [m["value"] for m in batch]
    kp = KafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip", linger_ms=20)
    futures = [kp.send(topic, value=f"kp-gzip-{i}".encode()) for i in range(300)]
    for f in futures:
        f.get(timeout=30)
    kp.close()
    expected += [f"kp-gzip-{i}".encode() for i in range(300)]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unpack",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    seen = {}
    poll_until({"only": consumer}, len(expected), seen)
    values = [m.value() for _, m in sorted(seen.values(), key=lambda s: s[1].offset())]
    assert values == expected, "every compressed record comes back in order"
    consumer.close()
    print(json.dumps({"records": len(values)}))


def scenario_idempotent(bootstrap, http_url):
    """Idempotent producers (librdkafka and kafka-python): InitProducerId, sequences."""
    from kafka import KafkaProducer
    topic = "exactly"
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5, "acks": "all"})
    produce_all(producer, topic, [{"value": f"m{i}".encode()} for i in range(2000)])
    kp = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    for f in [kp.send(topic, value=f"p{i}".encode()) for i in range(500)]:
        f.get(timeout=30)
    kp.close()
    status, info = http("GET", f"{http_url}/queues/{topic}")
    assert status == 200
    stored = sum(p["next_offset"] for p in info["partitions"])
    assert stored == 2500, f"{stored} stored"
    print(json.dumps({"stored": stored}))


def scenario_topics(bootstrap, http_url):
    """Create, describe, list and delete topics with kafka-python's admin client."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic as KNewTopic
    from kafka.errors import TopicAlreadyExistsError
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([KNewTopic("made", num_partitions=3, replication_factor=1,
                                   topic_configs={"retention.ms": "3600000"})])
    status, info = http("GET", f"{http_url}/queues/made")
    assert status == 200 and len(info["partitions"]) == 3, info
    assert info["settings"]["retention"]["max_age"] == 3600, info["settings"]
    try:
        admin.create_topics([KNewTopic("made", num_partitions=1, replication_factor=1)])
        raise AssertionError("creating an existing topic must fail")
    except TopicAlreadyExistsError:
        pass
    configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "made")])
    text = str(configs)
    assert "retention.ms" in text and "3600000" in text, text
    assert "made" in admin.list_topics()
    admin.delete_topics(["made"])
    until("the topic is gone", lambda: "made" not in admin.list_topics())
    status, _ = http("GET", f"{http_url}/queues/made")
    assert status == 404, status
    admin.close()
    print(json.dumps({"ok": True}))


def scenario_cross(bootstrap, http_url):
    """Kafka produce -> HTTP receive (key, headers, timestamp kept); HTTP publish -> Kafka."""
    topic = "bridge"
    status, _ = http("POST", f"{http_url}/queues/{topic}")
    assert status in (200, 201)
    ts = int(time.time() * 1000) - 60_000
    producer = Producer({"bootstrap.servers": bootstrap})
    produce_all(producer, topic, [{"value": b'{"to": "user@example.com"}', "key": b"user-7",
                                   "headers": [("trace", b"abc"), ("source", b"kafka")],
                                   "timestamp": ts}])
    status, got = http("GET", f"{http_url}/queues/{topic}/messages?group=web&wait=5")
    assert status == 200 and len(got["messages"]) == 1, got
    msg = got["messages"][0]
    assert msg["key"] == "user-7" and msg["timestamp"] == ts, msg
    assert msg["headers"] == {"trace": "abc", "source": "kafka"}, msg
    body = msg.get("body")
    assert body in ({"to": "user@example.com"}, '{"to": "user@example.com"}'), msg
    status, _ = http("POST", f"{http_url}/queues/{topic}/messages?key=from-web", b"hello from http",
                     {"Content-Type": "text/plain", "Qit-Header-origin": "http"})
    assert status == 201
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-side",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    seen = {}
    poll_until({"k": consumer}, 2, seen)
    second = seen[(0, 1)][1]
    assert second.key() == b"from-web" and second.value() == b"hello from http"
    headers = dict(second.headers())
    assert headers.get("origin") == b"http", headers
    assert headers.get("qit-content-type") == b"text/plain", headers
    # A tombstone (null value) comes back null and an empty value empty; over HTTP both
    # are empty bodies, without the marker.
    produce_all(producer, topic, [{"value": None, "key": b"gone"}, {"value": b"", "key": b"empty"}])
    poll_until({"k": consumer}, 4, seen)
    tombstone, empty = seen[(0, 2)][1], seen[(0, 3)][1]
    assert tombstone.key() == b"gone" and tombstone.value() is None, tombstone.value()
    assert empty.key() == b"empty" and empty.value() == b"", empty.value()
    assert not tombstone.headers() and not empty.headers(), (tombstone.headers(), empty.headers())
    status, log = http("GET", f"{http_url}/queues/{topic}/log?partition=0&from=2")
    assert status == 200 and len(log["messages"]) == 2, log
    for m in log["messages"]:
        assert m.get("body", m.get("body_base64")) == "" and m["headers"] == {}, m
    consumer.close()
    print(json.dumps({"ok": True}))


def scenario_sasl(bootstrap, http_url, password):
    """SASL/PLAIN with qit's users: the owner produces and consumes, a stranger is refused,
    a wrong password fails authentication."""
    def conf(user, pw):
        return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": "PLAIN", "sasl.username": user, "sasl.password": pw}

    for user in ["alice", "mallory"]:
        status, _ = http("POST", f"{http_url}/auth/register", {"username": user, "password": password})
        assert status == 201, status
    create_topic_conf = conf("alice", password)
    admin = AdminClient(create_topic_conf)
    admin.create_topics([NewTopic("private", num_partitions=1, replication_factor=1)])["private"].result(30)
    producer = Producer(conf("alice", password))
    produce_all(producer, "private", [{"value": b"secret"}])
    consumer = Consumer({**conf("alice", password), "group.id": "owners", "auto.offset.reset": "earliest"})
    consumer.subscribe(["private"])
    seen = {}
    poll_until({"alice": consumer}, 1, seen)
    consumer.commit(asynchronous=False)
    consumer.close()
    # Groups are listed and described to those who may consume their queues only.
    owners = [g.group_id for g in admin.list_consumer_groups().result(30).valid]
    assert "owners" in owners, owners
    mallory = AdminClient(conf("mallory", password))
    # Topics are listed to those who may see them only (the owner, grantees, the admin).
    assert "private" in admin.list_topics(timeout=30).topics
    listed = mallory.list_topics(timeout=30).topics
    assert "private" not in listed, f"a stranger lists the private topic: {sorted(listed)}"
    hidden = [g.group_id for g in mallory.list_consumer_groups().result(30).valid]
    assert "owners" not in hidden, hidden
    try:
        mallory.describe_consumer_groups(["owners"])["owners"].result(30)
        raise AssertionError("a stranger describes the owners' group")
    except Exception as e:  # confluent_kafka raises KafkaException(KafkaError)
        code = e.args[0].code() if e.args and hasattr(e.args[0], "code") else None
        assert code == KafkaError.GROUP_AUTHORIZATION_FAILED, repr(e)
    stranger = Producer({**conf("mallory", password), "message.timeout.ms": 10000})
    errors = []
    stranger.produce("private", b"intrusion", on_delivery=lambda err, m: errors.append(err))
    stranger.flush(30)
    assert errors and errors[0] is not None and errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, errors
    wrong = Producer({**conf("alice", "not-the-password"), "message.timeout.ms": 5000})
    failures = []
    wrong.produce("private", b"x", on_delivery=lambda err, m: failures.append(err))
    wrong.flush(30)
    assert failures and failures[0] is not None, "a wrong password does not produce"
    print(json.dumps({"stranger": str(errors[0]), "wrong_password": str(failures[0])}))


def scenario_kafka_python_group(bootstrap, http_url):
    """kafka-python's own group consumer: subscribe, poll, commit, and the commit read back
    by a new consumer and over HTTP."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as KTP
    topic, group = "kp", "kp-group"
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(50):
        producer.send(topic, key=b"k%d" % i, value=b"v%d" % i, headers=[("h", b"x")])
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    got = []
    until("kafka-python's consumer has all 50", lambda: (
        got.extend(r for rs in consumer.poll(timeout_ms=200).values() for r in rs), len(got) >= 50)[1])
    assert [r.value for r in got] == [b"v%d" % i for i in range(50)]
    assert got[7].key == b"k7" and got[7].headers == [("h", b"x")], got[7]
    consumer.commit()
    # Admin tools list and describe the group: while its consumer runs, Stable with that
    # member (client id, host, subscription, assignment); once it left, Empty. qit's own
    # group `default` of the queue is a group too.
    from kafka import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    listed = {g["group_id"]: g for g in admin.list_groups()}
    assert listed[group]["group_state"] == "Stable" and listed[group]["protocol_type"] == "consumer", listed
    assert listed["default"]["group_state"] == "Empty", listed
    described = admin.describe_groups([group, "nobody-has-this"])
    stable = described[group]
    assert stable["group_state"] == "Stable" and stable["protocol_data"] == "range", stable
    [member] = stable["members"]
    assert member["client_id"].startswith("kafka-python") and member["client_host"] == "/127.0.0.1", member
    assert member["member_metadata"]["topics"] == [topic], member
    assert member["member_assignment"]["assigned_partitions"] == [{"topic": topic, "partitions": [0]}], member
    assert described["nobody-has-this"]["group_state"] == "Dead", described
    # A group with members is not deleted (Kafka's NON_EMPTY_GROUP).
    confluent = AdminClient({"bootstrap.servers": bootstrap})
    assert delete_group_error(confluent, group) == KafkaError.NON_EMPTY_GROUP
    consumer.close()
    until("the group is empty once its consumer left",
          lambda: admin.describe_groups([group])[group]["group_state"] == "Empty")
    result = confluent.list_consumer_groups().result(30)
    empty = {g.group_id: g for g in result.valid}
    assert group in empty and "EMPTY" in str(empty[group].state), (empty, result.errors)
    admin.close()
    assert group_floors(http_url, topic, group) == {0: 50}
    again = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    assert again.committed(KTP(topic, 0)) == 50
    again.close()
    # Once empty, deleting it drops its committed offsets, which HTTP sees too.
    assert delete_group_error(confluent, group) is None
    status, _ = http("GET", f"{http_url}/queues/{topic}/groups/{group}")
    assert status == 404, f"the deleted group is still there: {status}"
    assert delete_group_error(confluent, group) == KafkaError.GROUP_ID_NOT_FOUND
    print(json.dumps({"ok": True}))


SCENARIOS = {
    "kafka_python_group": scenario_kafka_python_group,
    "group": scenario_group,
    "timestamps": scenario_timestamps,
    "compression": scenario_compression,
    "idempotent": scenario_idempotent,
    "topics": scenario_topics,
    "cross": scenario_cross,
    "sasl": scenario_sasl,
}

if __name__ == "__main__":
    name, bootstrap, http_url, *rest = sys.argv[1:]
    SCENARIOS[name](bootstrap, http_url, *rest)
