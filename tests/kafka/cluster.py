"""Real Kafka clients (confluent-kafka/librdkafka) against a three-node qit cluster.

Run by tests/cluster_kafka.rs: `python cluster.py SCENARIO ARGS...`. Each scenario asserts
what a Kafka user expects and exits non-zero (with the reason on stderr) when qit does
otherwise. Every wait is on a condition, bounded by a deadline that only guards against a
hang.
"""

import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from clients import DEADLINE_S, delete_group_error, group_floors, http, until  # noqa: E402


def delivering(producer, topic, messages, acked, errors):
    """Produces messages (dicts with value, key?, partition?); fills `acked` with the values
    the cluster acknowledged and `errors` with the others' errors."""
    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            acked.append(msg.value())

    for m in messages:
        extra = {"partition": m["partition"]} if "partition" in m else {}
        while True:
            try:
                producer.produce(topic, value=m["value"], key=m.get("key"), on_delivery=report, **extra)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)


def scenario_produce_elsewhere(bootstrap, http_url, topic, n):
    """An idempotent producer bootstrapped on one node writes to explicit partitions of a
    topic led by another node; the records are readable over HTTP on a third node."""
    n = int(n)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5})
    acked, errors = [], []
    delivering(producer, topic,
               [{"value": f"v{i}".encode(), "key": f"k{i}".encode(), "partition": i % 2}
                for i in range(n)], acked, errors)
    assert producer.flush(60) == 0, "every record delivered"
    assert not errors, errors[:5]
    assert len(acked) == n
    def bodies(p):
        status, log = http("GET", f"{http_url}/queues/{topic}/log?partition={p}&from=0&max=10000")
        assert status == 200, status
        return [m["body"] for m in log["messages"]]

    # This node is a follower: it holds what it learned is committed, a moment later.
    for p in range(2):
        want = [f"v{i}" for i in range(p, n, 2)]
        until(f"partition {p} holds every record, once, in order", lambda: bodies(p) == want)
    print(json.dumps({"acked": len(acked)}))


def consumer(bootstrap, group):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    return c


def poll_some(consumers, seen):
    """One round over the consumers, up to 500 records from each."""
    for name, c in consumers.items():
        for msg in c.consume(500, 0.02):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                if msg.error().retriable() or not msg.error().fatal():
                    continue
                raise AssertionError(f"consumer {name}: {msg.error()}")
            seen.setdefault(msg.value(), []).append((name, msg.partition(), msg.offset()))


def committed_everywhere(members, seen, http_url, topic, group, partitions):
    """Polls (heartbeats, rebalances) until the members together own every partition, then
    commits their positions; true once those are the qit group's floors: the end of every
    partition, as far as the members consumed."""
    poll_some(members, seen)
    owned = set()
    for c in members.values():
        owned |= {tp.partition for tp in c.assignment()}
    if owned != set(range(partitions)):
        return report(f"owned {owned}")
    for name, c in members.items():
        try:
            c.commit(asynchronous=False)
        except KafkaException as e:
            # Nothing consumed since it got its partitions: they stay where they were.
            if e.args[0].code() != KafkaError._NO_OFFSET:
                return report(f"commit of {name}: {e}")
    ends = {p: 0 for p in range(partitions)}
    for where in seen.values():
        for _, p, o in where:
            ends[p] = max(ends[p], o + 1)
    floors = group_floors(http_url, topic, group)
    return floors == ends or report(f"floors {floors}, ends {ends}")


REPORTED = [0.0]


def report(what):
    """Says on stderr (every 2 s at most) why a wait goes on; false."""
    if time.monotonic() - REPORTED[0] > 2:
        REPORTED[0] = time.monotonic()
        print(f"waiting: {what}", file=sys.stderr, flush=True)
    return False


def commit(c):
    """A synchronous commit, again while the group moves (coordinator failover, rebalance)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            c.commit(asynchronous=False)
            return
        except KafkaException as e:
            code = e.args[0].code()
            if code == KafkaError._NO_OFFSET:
                return
            assert time.monotonic() < deadline, f"commit never went through: {e}"
            c.poll(0.1)


def scenario_group(bootstrap_a, bootstrap_b, http_url, topic, group, n):
    """Two members of one group, connected to different nodes, share the partitions
    (disjoint), consume every record and commit; the commits are the qit group's floors."""
    n = int(n)
    producer = Producer({"bootstrap.servers": bootstrap_a, "acks": "all", "linger.ms": 5})
    acked, errors = [], []
    delivering(producer, topic, [{"value": f"m{i}".encode(), "key": f"k{i}".encode()}
                                 for i in range(n)], acked, errors)
    assert producer.flush(60) == 0 and not errors, errors[:5]
    members = {"a": consumer(bootstrap_a, group), "b": consumer(bootstrap_b, group)}
    for c in members.values():
        c.subscribe([topic])
    seen = {}
    deadline = time.monotonic() + DEADLINE_S
    while True:
        poll_some(members, seen)
        owned = {name: {tp.partition for tp in c.assignment()} for name, c in members.items()}
        if len(seen) >= n and all(owned.values()):
            break
        assert time.monotonic() < deadline, f"{len(seen)} of {n} seen, assignment {owned}"
    assert not (owned["a"] & owned["b"]), f"disjoint partitions: {owned}"
    assert owned["a"] | owned["b"] == set(range(4)), f"every partition owned: {owned}"
    assert set(seen) == {f"m{i}".encode() for i in range(n)}
    by_member = {}
    for value, where in seen.items():
        for name, p, _ in where:
            by_member.setdefault(name, set()).add(p)
    until("the commits show as the qit group's floors",
          lambda: committed_everywhere(members, seen, http_url, topic, group, 4))
    # An admin client finds the group on its coordinator, whichever node that is: listed
    # once (every node lists the groups it coordinates) and described with both members.
    from kafka import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_a)
    listed = [g["group_id"] for g in admin.list_groups()]
    assert listed.count(group) == 1, listed
    described = admin.describe_groups([group])[group]
    assert described["group_state"] == "Stable" and len(described["members"]) == 2, described
    admin.close()
    for c in members.values():
        c.close()
    # Once its members left, deleting it through either node (the client asks the group's
    # coordinator) drops the qit group on the topic's replicas.
    from confluent_kafka.admin import AdminClient
    deleter = AdminClient({"bootstrap.servers": bootstrap_b})
    until("the emptied group is deleted", lambda: delete_group_error(deleter, group) is None)
    status, _ = http("GET", f"{http_url}/queues/{topic}/groups/{group}")
    assert status == 404, f"the deleted group is still there: {status}"
    print(json.dumps({"owned": {k: sorted(v) for k, v in owned.items()},
                      "consumed": len(seen)}))


def scenario_failover(bootstrap, http_url, topic, group, n):
    """A producer and a group of two keep going while the node that leads the topic and
    coordinates the group is killed (the test kills it when this prints `kill`, and
    answers on stdin): every record the cluster acknowledged is consumed."""
    n = int(n)
    half = n // 2
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5, "message.timeout.ms": 120000})
    acked, errors = [], []
    delivering(producer, topic, [{"value": f"r{i}".encode(), "key": f"k{i}".encode()} for i in range(half)], acked, errors)
    assert producer.flush(60) == 0 and not errors, errors[:5]
    members = {"a": consumer(bootstrap, group), "b": consumer(bootstrap, group)}
    for c in members.values():
        c.subscribe([topic])
    seen = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(seen) < half // 2:
        poll_some(members, seen)
        assert time.monotonic() < deadline, f"only {len(seen)} consumed before the kill"
    for c in members.values():
        commit(c)
    # Records in flight when the node dies: their retries go to the new leader.
    quarter = half + (n - half) // 4
    delivering(producer, topic, [{"value": f"r{i}".encode(), "key": f"k{i}".encode()} for i in range(half, quarter)],
               acked, errors)
    print("kill", flush=True)
    assert sys.stdin.readline().strip() == "killed"
    killed_at = time.monotonic()
    delivering(producer, topic, [{"value": f"r{i}".encode(), "key": f"k{i}".encode()} for i in range(quarter, n)], acked, errors)
    deadline = time.monotonic() + 2 * DEADLINE_S
    while len(producer) > 0:
        producer.poll(0.05)
        poll_some(members, seen)
        assert time.monotonic() < deadline, f"{len(producer)} records still in flight"
    produced_s = time.monotonic() - killed_at
    missing = [v for v in acked if v not in seen]
    last_report = time.monotonic()
    while missing:
        poll_some(members, seen)
        if time.monotonic() - last_report > 2:
            last_report = time.monotonic()
            owned = {name: sorted(tp.partition for tp in c.assignment()) for name, c in members.items()}
            print(f"{time.monotonic() - killed_at:.1f}s: {len(missing)} missing, owned {owned}",
                  file=sys.stderr, flush=True)
        missing = [v for v in missing if v not in seen]
        assert time.monotonic() < deadline, f"{len(missing)} acknowledged records never consumed: {missing[:5]}"
    until("the commits through the new coordinator are the qit group's floors",
          lambda: committed_everywhere(members, seen, http_url, topic, group, 2))
    for c in members.values():
        c.close()
    counts = {}
    for value in acked:
        counts[value] = counts.get(value, 0) + 1
    assert all(c == 1 for c in counts.values()), "each record acknowledged once"
    status, info = http("GET", f"{http_url}/queues/{topic}")
    assert status == 200, status
    stored = sum(p["next_offset"] for p in info["partitions"])
    redelivered = sum(len(w) - 1 for w in seen.values())
    print(json.dumps({"acked": len(acked), "errors": len(errors), "stored": stored,
                      "consumed": len(seen), "consumed_again": redelivered,
                      "produced_after_kill_s": round(produced_s, 1),
                      "consumed_after_kill_s": round(time.monotonic() - killed_at, 1)}))


SCENARIOS = {
    "produce_elsewhere": scenario_produce_elsewhere,
    "group": scenario_group,
    "failover": scenario_failover,
}

if __name__ == "__main__":
    name, *args = sys.argv[1:]
    SCENARIOS[name](*args)
