#!/usr/bin/env bash
# Publish throughput of a three-node cluster against one node, both with `--fsync always`,
# on this machine (issue 13's throughput target: the cluster at >= 50 % of one node).
#
#   tools/cluster-bench.sh                       # target/release/qit, 3 runs of 100,000 each
#   QIT=target/release/qit RUNS=5 MESSAGES=200000 tools/cluster-bench.sh
#   BENCH_ARGS="--batch 100 --window 4" tools/cluster-bench.sh   # another load shape
#   PARTITIONS=3 tools/cluster-bench.sh          # a queue of 3 partitions (one leader each)
#
# The load is workload W1 of the README's Performance section: 100-byte messages, 2
# producers on gRPC Publish streams each keeping 100 publishes of one message unanswered,
# one partition, no consumers. The cluster's load goes through node 1 (`--server`), which
# forwards to the queue's leader when it does not lead it; VIA=leader sends it to the
# leader instead, VIA=follower to a node that does not lead it. Every run starts on fresh
# data directories (under $TMPDIR, removed at the end) and prints `uptime`: other work on
# the machine makes a figure an upper bound of the time it took. Each run also prints the
# CPU time the servers spent per 100,000 messages (user + system, from /proc), which moves
# much less than the rate when the machine is shared: compare builds by it too.
set -euo pipefail

QIT=${QIT:-target/release/qit}
RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-100000}
VIA=${VIA:-node1}
PARTITIONS=${PARTITIONS:-1}
BENCH_ARGS=${BENCH_ARGS:---batch 1 --window 100}
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/qit-cluster-bench.XXXXXX")
export QIT_CLUSTER_SECRET=cluster-bench-secret-0123456789
PEERS=1=127.0.0.1:27101,2=127.0.0.1:27102,3=127.0.0.1:27103

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$ROOT"' EXIT

wait_http() { # url
  for _ in $(seq 1 600); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}

bench() { # http grpc
  # shellcheck disable=SC2086
  "$QIT" bench --server "$1" --grpc-server "$2" $BENCH_ARGS --producers 2 --consumers 0 \
    --partitions "$PARTITIONS" --mode stream --messages "$MESSAGES" --json
}

rate() { python3 -c 'import json,sys; print(round(json.load(sys.stdin)["publish_msgs_per_s"]))'; }

# CPU time (user + system, clock ticks) the servers `pids` have used so far.
cpu_ticks() {
  local total=0 pid fields
  for pid in "${pids[@]}"; do
    read -r -a fields <"/proc/$pid/stat"
    total=$((total + fields[13] + fields[14]))
  done
  echo "$total"
}

# Runs the bench against `http` `grpc` and prints its rate and the CPU-seconds the servers
# spent per 100,000 messages meanwhile: a machine shared with other work moves the rate a
# lot and the CPU a message costs much less, so this is the figure to compare builds by.
bench_with_cpu() { # http grpc
  local before after rate
  before=$(cpu_ticks)
  rate=$(bench "$1" "$2" | rate)
  after=$(cpu_ticks)
  python3 -c "import os,sys; t=os.sysconf('SC_CLK_TCK'); print(sys.argv[1], round(($after-$before)/t*100000/$MESSAGES, 2))" "$rate"
}

single() {
  local dir=$ROOT/single-$1
  "$QIT" serve --fsync always --http 127.0.0.1:28080 --grpc 127.0.0.1:29090 \
    --data-dir "$dir" >"$dir.log" 2>&1 &
  pids+=($!)
  wait_http http://127.0.0.1:28080/healthz || { tail -n 30 "$dir.log" >&2; stop_all; return 1; }
  bench_with_cpu http://127.0.0.1:28080 http://127.0.0.1:29090
  stop_all
  rm -rf "$dir"
}

cluster() {
  local dir=$ROOT/cluster-$1
  for n in 1 2 3; do
    "$QIT" serve --fsync always --node-id "$n" --cluster "127.0.0.1:2710$n" --peers "$PEERS" \
      --http "127.0.0.1:2808$n" --grpc "127.0.0.1:2909$n" --data-dir "$dir/node-$n" \
      >"$dir-node-$n.log" 2>&1 &
    pids+=($!)
  done
  for n in 1 2 3; do
    # A node that does not come up shows why (its log goes with the run's directory).
    wait_http "http://127.0.0.1:2808$n/healthz" || { tail -n 30 "$dir-node-$n.log" >&2; stop_all; return 1; }
  done
  local http=http://127.0.0.1:28081 grpc=http://127.0.0.1:29091
  if [[ $VIA == leader || $VIA == follower ]]; then
    # The bench queue is made by the bench itself; make it first to find its leader.
    curl -fsS -X POST http://127.0.0.1:28081/queues/cluster-bench -H 'content-type: application/json' \
      -d "{\"partitions\":$PARTITIONS}" >/dev/null
    local leader=""
    for _ in $(seq 1 100); do
      leader=$(curl -fsS http://127.0.0.1:28081/cluster | python3 -c 'import json,sys; print(next((p["leader"] or "") for p in json.load(sys.stdin)["partitions"] if p["queue"]=="cluster-bench"))' 2>/dev/null || true)
      [[ -n $leader ]] && break
      sleep 0.1
    done
    local via=$leader
    if [[ $VIA == follower ]]; then via=$(( leader % 3 + 1 )); fi
    http=http://127.0.0.1:2808$via grpc=http://127.0.0.1:2909$via
    BENCH_ARGS="$BENCH_ARGS --queue cluster-bench"
  fi
  bench_with_cpu "$http" "$grpc"
  stop_all
  rm -rf "$dir" "$dir"-node-*.log
}

# Each measurement starts on a quiet disk: the previous run's data (hundreds of MB,
# deleted) is written back and trimmed first, so it does not land on the next run's syncs.
settle() { sync; sleep 1; }

mkdir -p "$ROOT"
echo "# qit publish, W1 shape (${BENCH_ARGS}), $PARTITIONS partition(s), --fsync always, $MESSAGES messages per run"
# Each measurement runs in a subshell (its servers are its own) and is waited for to the
# end: `read < <(...)` returned at its first line, before its servers had stopped, and the
# next run's servers found their ports taken.
measure_single() { # run
  settle
  local out
  out=$(single "$1")
  read -r s cpu <<<"$out"
  echo "run $1 single node: $s msg/s, $cpu CPU-s per 100k messages   ($(uptime | sed 's/.*load/load/'))"
}
measure_cluster() { # run
  settle
  local out
  out=$(cluster "$1")
  read -r c cpu <<<"$out"
  echo "run $1 three nodes (via $VIA): $c msg/s, $cpu CPU-s per 100k messages (all three)   ($(uptime | sed 's/.*load/load/'))"
}
# Odd runs measure one node first, even runs three nodes first, so that a drift of the
# machine over a series (the disk's state after the runs before) favours neither.
for run in $(seq 1 "$RUNS"); do
  if (( run % 2 )); then
    measure_single "$run"
    measure_cluster "$run"
  else
    measure_cluster "$run"
    measure_single "$run"
  fi
done
