#!/usr/bin/env python3
"""Random differential run of qit's HTTP API: the same random calls (queues, publishes with
and without keys and idempotency keys, batches, leases, acks, nacks, dead letters, redrive,
seeks, group deletes, log reads, exchanges and bindings) go to a single node and to a
cluster node, and every answer must match (status and body; timestamps, sizes on disk and
error wording left out). Stops at the first difference and prints it.

    target/release/qit serve --data-dir /tmp/single --http 127.0.0.1:8090 --grpc 127.0.0.1:9190 --kafka off &
    QIT=target/release/qit tools/cluster.sh &
    python3 tools/cluster-parity.py http://127.0.0.1:8090 http://127.0.0.1:8082 SEED [CALLS]

With AUTH=1 (both servers started with --auth) each call goes as one of three users
(alice, bob, carol: registered on the first run), who also grant and revoke each other
publish and consume on the queues.

Both servers must start without the queues fa, fb, fc (and their dead-letter queues) and the
exchanges xa, xb; run each seed on fresh servers, or delete those first. What it found is
in tests/cluster_parity.rs, which keeps a fixed script of such calls in CI.
"""
import json, os, sys, random, urllib.request, urllib.error


def call(base, method, path, body=None, headers=None, raw=False):
    data = None
    h = dict(headers or {})
    if body is not None:
        if isinstance(body, (bytes, str)):
            data = body.encode() if isinstance(body, str) else body
        else:
            data = json.dumps(body).encode(); h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=70) as r:
            status, text = r.status, r.read().decode()
            hdrs = dict(r.headers)
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
        hdrs = dict(e.headers)
    try:
        j = json.loads(text) if text else None
    except Exception:
        j = text
    return status, j, hdrs

def norm(x):
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if k in ("timestamp",): v = "<ts>"
            if k == "message" and isinstance(v, str): v = "<msg>"
            if k in ("bytes","segments"): v = "<n>"
            out[k] = norm(v)
        return out
    if isinstance(x, list):
        return [norm(v) for v in x]
    return x

seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
N = int(sys.argv[4]) if len(sys.argv) > 4 else 500
A, B = sys.argv[1], sys.argv[2]
rng = random.Random(seed)
queues = ["fa", "fb", "fa.dlq", "fc"]
groups = ["default", "g1", "g2"]
keys = [None, "k1", "k2", "k3"]
last_ids = {"A": [], "B": []}
AUTH = os.environ.get("AUTH") == "1"
USERS = ["alice", "bob", "carol"]

def login(base):
    """A token per user, registering them first (a repeat registration is refused)."""
    tokens = {}
    for u in USERS:
        password = "pw-" + u + "-123456"
        call(base, "POST", "/auth/register", {"username": u, "password": password})
        st, j, _ = call(base, "POST", "/auth/login", {"username": u, "password": password})
        tokens[u] = j["token"]
    return tokens

def gen():
    q = rng.choice(queues); g = rng.choice(groups)
    r = rng.random()
    if AUTH and r < 0.05:
        permissions = rng.sample(["publish", "consume"], rng.randrange(0, 3))
        return ("POST", f"/queues/{q}/grants", {"user": rng.choice(USERS), "permissions": permissions}, None)
    r = rng.random()
    if r < 0.05:
        s = rng.choice([{}, {"partitions": 2, "max_deliveries": 2, "backoff": [0]},
                        {"partitions": 3, "ordering": "key", "max_deliveries": 3},
                        {"max_in_flight": 2, "partitions": 2}, {"compaction": True},
                        {"dead_letter": "fc", "max_deliveries": 1},
                        {"max_deliveries": 0, "retention": {"policy": "acked"}},
                        {"partitions": 2, "max_message_bytes": 64}])
        return ("POST", f"/queues/{q}", s, None)
    if r < 0.07: return ("DELETE", f"/queues/{q}", None, None)
    if r < 0.35:
        k = rng.choice(keys); qs = f"?key={k}" if k else ""
        h = {"Content-Type": "text/plain"}
        if rng.random() < 0.2: h["Idempotency-Key"] = rng.choice(["i1","i2","i3"])
        return ("POST", f"/queues/{q}/messages{qs}", "m%d" % rng.randrange(1000), h)
    if r < 0.42:
        msgs = [{"body": "b%d" % rng.randrange(100), **({"key": rng.choice(keys[1:])} if rng.random()<0.5 else {})} for _ in range(rng.randrange(1,4))]
        return ("POST", f"/queues/{q}/messages/batch", {"messages": msgs}, None)
    if r < 0.60: return ("GET", f"/queues/{q}/messages?group={g}&max={rng.randrange(1,4)}", None, None)
    if r < 0.70: return ("ACK", q, g, None)
    if r < 0.78: return ("NACK", q, g, None)
    if r < 0.80: return ("POST", f"/queues/{q}/redrive", {"max": rng.randrange(1,3)}, None)
    if r < 0.84: return ("GET", f"/queues/{q}/groups/{g}", None, None)
    if r < 0.87: return ("GET", f"/queues/{q}", None, None)
    if r < 0.90: return ("GET", f"/queues/{q}/log?partition={rng.randrange(3)}&from={rng.randrange(4)}&max=5", None, None)
    if r < 0.92: return ("PUT", f"/queues/{q}/groups/{g}/offset", rng.choice([{"to":"earliest"},{"to":"latest"},{"partition":rng.randrange(3),"offset":rng.randrange(5)},{"from_time": 0}]), None)
    if r < 0.93: return ("EXTEND", q, g, None)
    if r < 0.95: return ("DELETE", f"/queues/{q}/groups/{g}", None, None)
    if r < 0.96:
        x = rng.choice(["xa","xb"])
        return ("POST", f"/exchanges/{x}", {"type": rng.choice(["direct","fanout","topic","headers"])}, None)
    if r < 0.97:
        x = rng.choice(["xa","xb"])
        binding = rng.choice([{"key": rng.choice(["k1","k2","k*","#"])}, {"headers": {"h": "1"}, "match": rng.choice(["all","any"])}])
        return (rng.choice(["POST","DELETE"]), f"/exchanges/{x}/bindings", {"queue": q, **binding}, None)
    if r < 0.985:
        x = rng.choice(["xa","xb"])
        h = {"Content-Type": "text/plain"}
        if rng.random() < 0.5: h["Qit-Header-h"] = rng.choice(["1", "2"])
        return ("POST", f"/exchanges/{x}/messages?key={rng.choice(['k1','k2','k3'])}", "x%d" % rng.randrange(100), h)
    if r < 0.99:
        return ("GET", "/exchanges", None, None)
    return ("GET", "/queues", None, None)

leased = {"A": {}, "B": {}}  # (q,g) -> list of ids
def do(base, side, op):
    m, p, b, h = op
    h = dict(h or {})
    if AUTH:
        h["Authorization"] = "Bearer " + tokens[side][op_user[0]]
    if m in ("ACK", "NACK", "EXTEND"):
        q, g = p, b
        ids = leased[side].get((q, g), [])
        if not ids: return ("skip", None, None)
        idx = op_pick[0] % len(ids)
        mid = ids[idx] if m == "EXTEND" else ids.pop(idx)
        if m == "ACK":
            st, j, _ = call(base, "DELETE", f"/queues/{q}/messages/{mid}?group={g}", None, h)
        elif m == "EXTEND":
            st, j, _ = call(base, "POST", f"/queues/{q}/messages/{mid}/extend?group={g}&visibility=60", None, h)
        else:
            st, j, _ = call(base, "POST", f"/queues/{q}/messages/{mid}/nack?group={g}&delay=0", None, h)
        return (f"{m} {q} {g} {mid}", st, norm(j))
    st, j, _ = call(base, m, p, b, h)
    if m == "GET" and "/messages?" in p and st == 200:
        q = p.split("/")[2]; g = p.split("group=")[1].split("&")[0]
        leased[side].setdefault((q, g), []).extend(x["id"] for x in j["messages"])
    if m == "DELETE" and p.count("/") == 2 and st == 204:
        q = p.split("/")[2]
        for k in list(leased[side]):
            if k[0] == q: del leased[side][k]
    return (f"{m} {p} {json.dumps(b)[:60] if b else ''}", st, norm(j))

op_pick = [0]
op_user = [USERS[0]]
tokens = {"A": login(A), "B": login(B)} if AUTH else {}
for i in range(N):
    op = gen()
    op_pick[0] = rng.randrange(100)
    op_user[0] = rng.choice(USERS)
    a = do(A, "A", op); b = do(B, "B", op)
    if a != b:
        print("DIVERGED at step", i, "seed", seed)
        print("  op:", a[0]); print("  single :", a[1], json.dumps(a[2])[:700]); print("  cluster:", b[1], json.dumps(b[2])[:700])
        sys.exit(1)
print("seed", seed, "ok", N)
