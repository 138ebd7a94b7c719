#!/usr/bin/env bash
# Installs the Kafka clients the Kafka tests drive, when missing: a Python venv with
# kafka-python and confluent-kafka (which ships librdkafka) under target/kafka-venv, and
# Debian's kcat when running as root. Prints the venv's python on its last line.
# Called by tests/kafka_clients.rs and .ci/run; safe to run again (it checks first).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${QIT_KAFKA_VENV:-$root/target/kafka-venv}"
python="$venv/bin/python"
exec 9>"$root/target/.kafka-clients.lock" 2>/dev/null || { mkdir -p "$root/target"; exec 9>"$root/target/.kafka-clients.lock"; }
flock 9
if ! "$python" -c 'import kafka, confluent_kafka' >/dev/null 2>&1; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'kafka-python==3.0.12' 'confluent-kafka==2.16.1' >&2
fi
if ! command -v kcat >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q kcat >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q kcat >/dev/null 2>&1; }) || echo "kcat could not be installed" >&2
fi
echo "$python"
