"""Kafka-protocol throughput against a running qit: librdkafka (confluent-kafka) producer
with linger.ms=5 and 100-byte messages, then a consumer reading them back.

    python tools/kafka-bench.py BOOTSTRAP [MESSAGES]

Run it with the venv of tools/kafka-clients.sh, against `qit serve --fsync interval`
(release build). Prints one JSON line: produce_msgs_per_s, consume_msgs_per_s.
"""

import json
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def main():
    bootstrap = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "batch.size": 1_000_000, "queue.buffering.max.messages": 1_000_000,
                         "acks": "all"})
    payload = b"x" * 100
    failed = []
    start = time.perf_counter()
    for _ in range(n):
        try:
            producer.produce(topic, payload)
        except BufferError:
            producer.poll(0.001)
            producer.produce(topic, payload)
    left = producer.flush(120)
    produce_s = time.perf_counter() - start
    assert left == 0 and not failed
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got, start = 0, None
    deadline = time.monotonic() + 300
    while got < n and time.monotonic() < deadline:
        batch = consumer.consume(num_messages=100_000, timeout=1.0)
        if batch and start is None:
            start = time.perf_counter()
        got += sum(1 for m in batch if not m.error())
    consume_s = time.perf_counter() - start
    consumer.close()
    print(json.dumps({"messages": n, "produce_msgs_per_s": round(n / produce_s),
                      "consume_msgs_per_s": round(got / consume_s), "consumed": got}))


if __name__ == "__main__":
    main()
