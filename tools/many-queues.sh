#!/usr/bin/env bash
# Many queues on one node (issue 17): starts a release `qit serve` on a fresh data
# directory, runs `qit bench --queues N` against it (create rate, cold publish latency,
# idle threads / descriptors / RSS / CPU), then restarts the server and measures the time
# from start to a healthy answer on /healthz with all N queues (and their DLQs) opened.
#
# Then, with every queue present, it pages through GET /queues, times one GET /metrics
# and deletes one queue.
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
echo "restart:   $(echo "$ended - $began" | bc) s to healthy with $count queues ($(uptime | sed 's/.*load average: //' | cut -d, -f1) load)"
# The CPU the start took: under load, the time to healthy is this over the share of the
# cores the process gets.
echo "restart CPU: $(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f s user, %.2f s system", $14/hz, $15/hz}' /proc/$SERVER_PID/stat)"
sleep 2
echo "after restart: $(grep Threads /proc/$SERVER_PID/status | tr -s '\t' ' '), $(ls /proc/$SERVER_PID/fd | wc -l) descriptors, $(awk '/VmRSS/{printf "%.1f MiB", $2/1024}' /proc/$SERVER_PID/status)"

# With every queue present: paging through GET /queues, one GET /metrics, one deletion.
python3 - "http://$HTTP" "$N" <<'PY'
import json, sys, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
started, names, pages, after = time.time(), [], 0, None
while True:
    url = f"{base}/queues?limit=1000" + (f"&after={after}" if after else "")
    page = json.load(urllib.request.urlopen(url))
    pages += 1
    names += [q["name"] for q in page["queues"]]
    after = page.get("next")
    if not after:
        break
assert names == sorted(names) and len(set(names)) == len(names) == 2 * n, len(names)
print(f"GET /queues?limit=1000&after=: {len(names)} queues in {pages} pages, {time.time() - started:.2f} s")
started = time.time()
body = urllib.request.urlopen(f"{base}/metrics").read()
print(f"GET /metrics: {len(body) / 1024:.0f} KiB in {(time.time() - started) * 1000:.0f} ms")
victim = next(name for name in names if not name.endswith(".dlq"))
started = time.time()
urllib.request.urlopen(urllib.request.Request(f"{base}/queues/{victim}", method="DELETE"))
took = time.time() - started
gone = urllib.request.Request(f"{base}/queues/{victim}")
try:
    urllib.request.urlopen(gone)
    raise SystemExit(f"{victim} still answers after DELETE")
except urllib.error.HTTPError as e:
    assert e.code == 404, e.code
print(f"DELETE /queues/{victim}: {took * 1000:.1f} ms with {len(names)} queues present (then 404)")
PY
