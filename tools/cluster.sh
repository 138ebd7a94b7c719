#!/usr/bin/env bash
# Starts a three-node qit cluster on this machine (loopback), in the foreground; Ctrl-C
# stops all three. Data goes under $QIT_CLUSTER_DIR (default ./qit-cluster), one directory
# per node; logs to node-N.log there.
#
#   tools/cluster.sh                 # nodes 1..3: HTTP 8081..8083, gRPC 9091..9093,
#                                    # Kafka 19091..19093, cluster 7101..7103
#   QIT=target/release/qit tools/cluster.sh
#   curl -s localhost:8081/cluster   # who leads what
#
# Every node gets the same --peers and the same secret ($QIT_CLUSTER_SECRET, generated
# into $QIT_CLUSTER_DIR/secret when unset). Extra arguments go to every `qit serve`.
set -euo pipefail

QIT=${QIT:-target/debug/qit}
DIR=${QIT_CLUSTER_DIR:-qit-cluster}
mkdir -p "$DIR"
if [[ -z "${QIT_CLUSTER_SECRET:-}" ]]; then
  if [[ ! -s "$DIR/secret" ]]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/secret")
  fi
  QIT_CLUSTER_SECRET=$(cat "$DIR/secret")
fi
export QIT_CLUSTER_SECRET
PEERS=1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103

pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait
}
trap stop INT TERM EXIT

for n in 1 2 3; do
  "$QIT" serve --node-id "$n" --cluster "127.0.0.1:710$n" --peers "$PEERS" \
    --http "127.0.0.1:808$n" --grpc "127.0.0.1:909$n" --kafka "127.0.0.1:1909$n" \
    --data-dir "$DIR/node-$n" "$@" \
    >"$DIR/node-$n.log" 2>&1 &
  pids+=($!)
done
echo "qit cluster: HTTP 127.0.0.1:8081..8083, gRPC 9091..9093, Kafka 19091..19093; logs in $DIR/node-*.log"
for _ in $(seq 1 100); do
  if curl -fsS 127.0.0.1:8081/cluster >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -sS 127.0.0.1:8081/cluster || true
echo
wait
