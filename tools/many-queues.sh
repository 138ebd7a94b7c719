#!/usr/bin/env bash
# Many queues on one node (issue 17): starts a release `qit serve` on a fresh data
# directory, runs `qit bench --queues N` against it (create rate, cold publish latency,
# idle threads / descriptors / RSS / CPU), then restarts the server and measures the time
# from start to a healthy answer on /healthz with all N queues (and their DLQs) opened.
#
# usage: tools/many-queues.sh [N=10000] [extra serve flags...]
# The server gets a config file allowing the N queues and their N dead-letter queues
# (`max_queues` counts both; its default, 10,000, would stop at 5,000 queues with DLQs).
set -euo pipefail
N=${1:-10000}
shift || true
QIT=${QIT:-target/release/qit}
DIR=$(mktemp -d /tmp/qit-many-XXXXXX)
HTTP=127.0.0.1:${HTTP_PORT:-18080}
GRPC=127.0.0.1:${GRPC_PORT:-19090}
SERVER_PID=

CONFIG="$DIR.toml"
echo "max_queues = $((2 * N + 16))" > "$CONFIG"

start() {
  RUST_LOG=warn "$QIT" serve --data-dir "$DIR" --http "$HTTP" --grpc "$GRPC" --config "$CONFIG" "$@" &
  SERVER_PID=$!
}
stop() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=
}
wait_healthy() {
  until curl -sf -o /dev/null "http://$HTTP/healthz"; do sleep 0.01; done
}
trap 'stop; rm -rf "$DIR" "$CONFIG"' EXIT

start "$@"
wait_healthy
"$QIT" bench --server "http://$HTTP" --queues "$N" --server-pid "$SERVER_PID"
echo "data directory: $(du -sh "$DIR" | cut -f1)"
stop

began=$(date +%s.%N)
start "$@"
wait_healthy
ended=$(date +%s.%N)
count=$(curl -s "http://$HTTP/metrics" | awk '/^qit_queues /{print $2}')
echo "restart:   $(echo "$ended - $began" | bc) s to healthy with $count queues"
sleep 2
echo "after restart: $(grep Threads /proc/$SERVER_PID/status | tr -s '\t' ' '), $(ls /proc/$SERVER_PID/fd | wc -l) descriptors, $(awk '/VmRSS/{printf "%.1f MiB", $2/1024}' /proc/$SERVER_PID/status)"
