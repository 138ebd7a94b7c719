#!/usr/bin/env python3
"""Measures a three-node qit cluster on this machine (loopback ports 17101..3, 18081..3,
19091..3): `failover N` kills the leader of a queue N times with SIGKILL and times the
first publish answered through a survivor, then checks that every publish answered 2xx
(a few before each kill, the timed one after it) is in the queue's log on every node;
`idle` creates 100 queues x 3 partitions and reports each node's CPU over 60 idle seconds
and whether any group changed term.

    python3 tools/cluster-measure.py target/release/qit failover 30
    python3 tools/cluster-measure.py target/release/qit idle
"""
import json, os, signal, subprocess, sys, time, urllib.request, urllib.error, shutil, tempfile
QIT = sys.argv[1]
MODE = sys.argv[2]  # idle | failover
ROOT = tempfile.mkdtemp(prefix="qit-measure-")
PEERS = "1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
procs = {}
def start(n):
    env = dict(os.environ, QIT_CLUSTER_SECRET="measure-secret-0123456789", RUST_LOG="error")
    procs[n] = subprocess.Popen([QIT, "serve", "--node-id", str(n), "--cluster", f"127.0.0.1:1710{n}",
        "--peers", PEERS, "--http", f"127.0.0.1:1808{n}", "--grpc", f"127.0.0.1:1909{n}",
        "--data-dir", f"{ROOT}/n{n}"], env=env, stdout=subprocess.DEVNULL, stderr=open(f"{ROOT}/n{n}.log", "a"))
def req(method, url, body=None, timeout=5):
    r = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception:
        return None, None
def view(n):
    s, v = req("GET", f"http://127.0.0.1:1808{n}/cluster", timeout=2)
    return v if s == 200 else None
def wait(cond, limit=60, what=""):
    t = time.time()
    while not cond():
        if time.time() - t > limit: raise SystemExit(f"timeout waiting: {what or cond}")
        time.sleep(0.02)
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
try:
    for n in (1,2,3): start(n)
    wait(lambda: all((view(n) or {}).get("leader") for n in (1,2,3)))
    if MODE == "idle":
        for i in range(100):
            wait(lambda: req("POST", f"http://127.0.0.1:18081/queues/idle-{i}", b'{"partitions":3,"max_deliveries":0}')[0] in (200, 201) or req("GET", f"http://127.0.0.1:18081/queues/idle-{i}")[0] == 200)
        wait(lambda: all(p["leader"] for p in view(1)["partitions"]) and len(view(1)["partitions"]) == 300)
        leaders = {}
        for p in view(1)["partitions"]: leaders[p["leader"]] = leaders.get(p["leader"], 0) + 1
        print("partitions led per node", leaders)
        time.sleep(5)
        terms0 = {p["queue"]: p["term"] for p in view(1)["partitions"]}
        c0 = {n: cpu(procs[n].pid) for n in procs}; t0 = time.time()
        time.sleep(60)
        c1 = {n: cpu(procs[n].pid) for n in procs}; t1 = time.time()
        terms1 = {p["queue"]: p["term"] for p in view(1)["partitions"]}
        print("cpu % of a core per node over 60 s idle:", {n: round(100*(c1[n]-c0[n])/(t1-t0),1) for n in procs})
        print("queue groups whose term changed while idle:", sum(1 for q in terms0 if terms1.get(q) != terms0[q]))
    else:
        wait(lambda: req("POST", "http://127.0.0.1:18081/queues/f", b'{"partitions":1}')[0] in (200, 201, 409))
        times, acked = [], []
        def publish(n, body):
            s, _ = req("POST", f"http://127.0.0.1:1808{n}/queues/f/messages", json.dumps(body).encode(), timeout=3)
            if s in (200, 201): acked.append(body); return True
            return False
        for k in range(int(sys.argv[3])):
            def leader():
                for n in (1,2,3):
                    v = view(n)
                    if v:
                        for p in v["partitions"]:
                            if p["queue"] == "f" and p["leader"]: return p["leader"]
            wait(lambda: leader() is not None, what=f"kill {k}: a leader of f")
            L = leader()
            surv = [n for n in (1,2,3) if n != L][0]
            for i in range(5):
                wait(lambda: publish(surv, f"k{k}-before-{i}"))
            t = time.time(); procs[L].send_signal(signal.SIGKILL); procs[L].wait()
            wait(lambda: publish(surv, f"k{k}-after"), what=f"kill {k}: publish after")
            times.append(time.time() - t)
            start(L)
            wait(lambda: view(L) is not None and all(p["leader"] for p in view(L)["partitions"]), what=f"kill {k}: node {L} back with leaders")
            time.sleep(1)
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
        print("failover seconds over", len(times), "kills: p50", round(q(0.5),3), "p90", round(q(0.9),3),
              "max", round(times[-1],3), "all", [round(x,2) for x in times])
        for n in (1,2,3):
            def has_all():
                s, v = req("GET", f"http://127.0.0.1:1808{n}/queues/f/log?partition=0&from=0&max=1000")
                if s != 200: return False
                got = " ".join(json.dumps(m) for m in v["messages"])
                return all(b in got for b in acked)
            wait(has_all, limit=30)
        print("acknowledged publishes:", len(acked), "- all in the log of every node")
finally:
    for p in procs.values():
        p.kill(); p.wait()
    shutil.rmtree(ROOT, ignore_errors=True)
