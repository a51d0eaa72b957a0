#!/usr/bin/env python3
"""End-to-end check of deploy/haproxy/haproxy.cfg without Docker.

Starts three real `tandem` nodes on loopback ports (embedded SQLite, in-process fan-out:
this checks the load balancer, not Redis/PostgreSQL), runs HAProxy with the compose
config rewritten only where Docker differs (server addresses, bind addresses, no Docker
DNS resolver) and checks:

  1. HAProxy marks all three nodes UP from their /ready probes;
  2. WebSocket sessions go through HAProxy (header auth, subscribe -> snapshot,
     update -> ack) and leastconn spreads them over the nodes;
  3. an idle WebSocket outlives `timeout client`/`timeout server` (shortened to 2s for this
     run) because `timeout tunnel` governs upgraded connections;
  4. on SIGTERM a node closes its sessions with 4000, exits 0, HAProxy marks it DOWN, and
     new sessions all land on the two remaining nodes.

Usage: TANDEM_BIN=path/to/tandem python3 deploy/checks/haproxy_e2e.py
Needs: haproxy on PATH, the `websockets` Python package. Exit 0 = pass, 1 = fail,
77 = a prerequisite is missing (the caller reports it as skipped).
Only loopback addresses are used; every wait is bounded.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

SKIP = 77
HERE = Path(__file__).resolve().parent
CFG = Path(os.environ.get("HAPROXY_CFG") or HERE.parent / "haproxy" / "haproxy.cfg")


def log(msg):
    print(f"  e2e: {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0):
    """Returns (status, body) or (None, error text)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def wait_for(what, pred, timeout=20.0, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def haproxy_status(stats_port):
    """{server name: status} from the stats page's CSV."""
    status, body = http_get(f"http://127.0.0.1:{stats_port}/;csv")
    if status != 200:
        return {}
    out = {}
    for line in body.splitlines():
        cols = line.split(",")
        if len(cols) > 17 and cols[0] == "tandem_nodes" and cols[1].startswith("tandem-"):
            out[cols[1]] = cols[17]
    return out


def render_cfg(node_ports, lb_port, stats_port):
    text = CFG.read_text()
    # Docker's DNS resolver section and its use: not available (nor needed) here.
    text = re.sub(r"\nresolvers docker\n(?:[ \t]+.*\n)+", "\n", text)
    text = text.replace(" resolvers docker", "")
    for i, port in enumerate(node_ports, start=1):
        old = f"server tandem-{i} tandem-{i}:7420"
        assert old in text, f"{CFG}: expected `{old}`"
        text = text.replace(old, f"server tandem-{i} 127.0.0.1:{port}")
    for old, new in ((":7420", f"127.0.0.1:{lb_port}"), (":8404", f"127.0.0.1:{stats_port}")):
        assert f"bind {old}\n" in text, f"{CFG}: expected `bind {old}`"
        text = text.replace(f"bind {old}\n", f"bind {new}\n")
    # Short client/server timeouts prove that the tunnel timeout is what governs an
    # upgraded WebSocket (the real values are 60s).
    for side in ("client", "server"):
        text, n = re.subn(rf"timeout {side} \S+\n", f"timeout {side} 2s\n", text)
        assert n == 1, f"{CFG}: expected one `timeout {side}`"
    assert "timeout tunnel" in text, f"{CFG}: no `timeout tunnel`"
    # maxconn sizes HAProxy's file-descriptor need; compose raises the container's limit,
    # a shell here may not allow as many.
    text, n = re.subn(r"\n(\s+)maxconn \d+\n", r"\n\1maxconn 4096\n", text)
    assert n == 1, f"{CFG}: expected one global `maxconn`"
    return text


def main():
    tandem = os.environ.get("TANDEM_BIN")
    if not tandem or not os.access(tandem, os.X_OK):
        print("  e2e: SKIP: set TANDEM_BIN to a built `tandem` binary")
        return SKIP
    if not shutil.which("haproxy"):
        print("  e2e: SKIP: haproxy not installed (apt-get install haproxy)")
        return SKIP
    # websockets >= 14 prefers `with connect(...)`; plain calls still work.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect
    except ImportError:
        print("  e2e: SKIP: python package `websockets` missing (pip install websockets)")
        return SKIP

    procs = []
    work = Path(tempfile.mkdtemp(prefix="tandem-haproxy-e2e-"))
    try:
        secret = secrets.token_hex(32)
        ports = [free_port() for _ in range(3)]
        lb_port, stats_port = free_port(), free_port()
        nodes = []
        for i, port in enumerate(ports, start=1):
            env = dict(
                os.environ,
                TANDEM_LISTEN=f"127.0.0.1:{port}",
                TANDEM_DATA_DIR=str(work / f"node{i}"),
                TANDEM_JWT_SECRET=secret,
                TANDEM_SHUTDOWN_GRACE="5s",
                RUST_LOG="warn",
            )
            for var in ("TANDEM_STORE", "TANDEM_REDIS", "TANDEM_CONFIG"):
                env.pop(var, None)
            logf = open(work / f"node{i}.log", "w")  # noqa: SIM115 (lives as long as the node)
            p = subprocess.Popen([tandem, "serve"], env=env, stdout=logf, stderr=logf)
            procs.append(p)
            nodes.append((p, port))
        for i, (p, port) in enumerate(nodes, start=1):
            wait_for(
                f"node {i} /ready", lambda port=port: http_get(f"http://127.0.0.1:{port}/ready")[0] == 200
            )
        log(f"3 tandem nodes ready on 127.0.0.1:{ports}")

        cfg = work / "haproxy.cfg"
        cfg.write_text(render_cfg(ports, lb_port, stats_port))
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise AssertionError(f"haproxy -c on the rendered config failed:\n{check.stdout}{check.stderr}")
        hlog = open(work / "haproxy.log", "w")  # noqa: SIM115 (lives as long as haproxy)
        hap = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=hlog, stderr=hlog)
        procs.append(hap)
        wait_for(
            "HAProxy to mark 3 nodes UP", lambda: list(haproxy_status(stats_port).values()) == ["UP"] * 3
        )
        log(f"haproxy on 127.0.0.1:{lb_port}: {haproxy_status(stats_port)}")

        status, body = http_get(f"http://127.0.0.1:{lb_port}/ready")
        assert status == 200, f"/ready through HAProxy: {status} {body}"

        token = subprocess.run(
            [tandem, "token", "--jwt-secret", secret, "--sub", "e2e-user", "--ttl", "10m"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        url = f"ws://127.0.0.1:{lb_port}/v1/sync"
        headers = {"Authorization": f"Bearer {token}"}

        def recv_until(ws, wanted, limit=5):
            """Frames until one of type `wanted` (a `ready` after header auth may come first)."""
            seen = []
            for _ in range(limit):
                frame = json.loads(ws.recv(timeout=5))
                seen.append(frame)
                if frame.get("type") == wanted:
                    return frame
            raise AssertionError(f"no `{wanted}` frame; got {seen}")

        def open_session(n):
            ws = connect(url, additional_headers=headers, open_timeout=5, close_timeout=2)
            ws.send(json.dumps({"type": "subscribe", "id": 1, "dataset": {"name": f"e2e-{n}"}}))
            recv_until(ws, "snapshot")
            return ws

        def sessions_per_node():
            """Open sessions per node from its /ready body; None for a node that is gone."""
            out = []
            for port in ports:
                status, body = http_get(f"http://127.0.0.1:{port}/ready")
                out.append(json.loads(body).get("sessions") if status else None)
            return out

        conns = [open_session(n) for n in range(6)]
        per_node = sessions_per_node()
        log(f"6 sessions through HAProxy, per node: {per_node}")
        assert all(s and s >= 1 for s in per_node), f"leastconn should use every node: {per_node}"

        conns[0].send(
            json.dumps(
                {
                    "type": "update",
                    "id": 2,
                    "dataset": {"name": "e2e-0"},
                    "patches": [{"op": "replace", "key": "k", "value": "v", "syncCount": 0}],
                }
            )
        )
        ack = recv_until(conns[0], "ack")
        assert ack.get("syncCount") == 1, f"update: {ack}"
        log("update through HAProxy acknowledged (syncCount 1)")

        time.sleep(4)  # twice the shortened client/server timeouts
        conns[1].send(json.dumps({"type": "ping", "id": 3}))
        recv_until(conns[1], "pong")
        log("idle WebSocket survived 4s with client/server timeouts of 2s (tunnel timeout applies)")

        # Drain node 1.
        victim = nodes[0][0]
        on_victim = per_node[0]
        victim.send_signal(signal.SIGTERM)
        codes = []
        for ws in conns:
            try:
                ws.recv(timeout=3)
                codes.append("open")
            except TimeoutError:
                codes.append("open")
            except ConnectionClosed as e:
                codes.append(e.rcvd.code if e.rcvd else "no close frame")
        closed_4000 = codes.count(4000)
        log(f"SIGTERM to node 1 ({on_victim} sessions): close codes seen by clients {codes}")
        assert closed_4000 == on_victim, f"expected {on_victim} sessions closed with 4000, got {codes}"
        rc = victim.wait(timeout=15)
        assert rc == 0, f"node 1 exited {rc}"
        wait_for(
            "HAProxy to mark tandem-1 DOWN",
            lambda: haproxy_status(stats_port).get("tandem-1", "").startswith("DOWN"),
            timeout=15,
        )
        log(f"node 1 exited 0; haproxy: {haproxy_status(stats_port)}")

        for ws in conns:
            ws.close()
        more = [open_session(100 + n) for n in range(4)]
        per_node = sessions_per_node()
        log(f"4 new sessions after the drain, per node: {per_node}")
        assert per_node[0] is None and sum(s for s in per_node[1:] if s) >= 4, per_node
        for ws in more:
            ws.close()
        print("  e2e: PASS")
        return 0
    except Exception as e:  # noqa: BLE001 -- an assertion, a closed WebSocket, a refused connection...
        print(f"  e2e: FAIL: {type(e).__name__}: {e}")
        for f in sorted(work.glob("*.log")):
            print(f"  --- {f.name} (last lines)")
            for line in f.read_text().splitlines()[-15:]:
                print(f"  {line}")
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
