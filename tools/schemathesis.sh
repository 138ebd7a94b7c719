#!/usr/bin/env bash
# Property-based API testing: runs schemathesis (PyPI) against a fresh qit server and its
# own /openapi.json. Fails on any 5xx and on any response that breaks the document (status,
# content type, headers, body schema). Runs twice: auth off, and --auth with a token.
#
#   tools/schemathesis.sh                             # bounded: 25 examples per operation, 120 s a run (CI)
#   ST_EXAMPLES=300 ST_MAX_TIME=1800 tools/schemathesis.sh  # longer
#
# Needs the debug binary (built here as `cargo test` builds it); installs schemathesis with pip when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES="${ST_EXAMPLES:-25}"
MAX_TIME="${ST_MAX_TIME:-120}"
CHECKS="not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"

if ! command -v schemathesis >/dev/null 2>&1; then
  python3 -m pip install --quiet 'schemathesis>=4.32,<5'
fi
# The binary `cargo test` built (same features as the tests: `cargo build --bin qit` alone
# would build every dependency a second time with other features).
cargo test --no-run --quiet
BIN="$PWD/target/debug/qit"

WORK="$(mktemp -d /tmp/qit-schemathesis.XXXXXX)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_server NAME [extra flags...]: a server on free ports with data under $WORK/NAME.
start_server() {
  local name="$1"; shift
  HTTP_PORT="$(free_port)"
  "$BIN" serve --data-dir "$WORK/$name" --http "127.0.0.1:$HTTP_PORT" --grpc "127.0.0.1:$(free_port)" "$@" >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  BASE="http://127.0.0.1:$HTTP_PORT"
  for _ in $(seq 1 200); do
    curl -fsS "$BASE/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/$name.log"; return 1; }
    sleep 0.05
  done
  echo "qit did not start" >&2; cat "$WORK/$name.log"; return 1
}

stop_server() {
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
}

# run NAME [schemathesis flags...]
run() {
  local name="$1"; shift
  echo "== schemathesis ($name): $EXAMPLES examples per operation against $BASE"
  timeout 900 schemathesis --config-file tools/schemathesis.toml run "$BASE/openapi.json" --checks "$CHECKS" \
    --max-examples "$EXAMPLES" --workers 1 --generation-deterministic --no-color --max-time "$MAX_TIME" "$@"
}

start_server open
run "auth off"
stop_server

start_server auth --auth
curl -fsS -X POST "$BASE/auth/register" -H 'content-type: application/json' \
  -d '{"username":"fuzz","password":"fuzz-password-1"}' >/dev/null
TOKEN="$(curl -fsS -X POST "$BASE/auth/login" -H 'content-type: application/json' \
  -d '{"username":"fuzz","password":"fuzz-password-1"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
run "auth on" -H "Authorization: Bearer $TOKEN"
stop_server
echo "schemathesis: no 5xx, every response matches the document"
