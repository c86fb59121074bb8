"""Control channel on loopback: a real uvicorn master mounting ControlServer.handle and real
ControlClients (fake load/drain callbacks, no model) or raw `websockets` peers.

Everything runs on one event loop per test (uvicorn.Server as a task), so the test can call
the server's API directly and read the registry without thread hand-offs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
import uvicorn
import websockets
from fastapi import FastAPI

from cluster.control import ControlServer
from cluster.control_client import ControlClient, control_url
from cluster.control_messages import (
    MAX_MESSAGE_BYTES,
    Assign,
    Failed,
    Heartbeat,
    ProtocolError,
    Ready,
    Register,
    auth_digest,
    dump,
    parse,
)
from cluster.heartbeat import PingTracker
from cluster.registry import NodeRegistry, NodeState
from cluster.worker_conn import LoadFailed, WorkerLost

from .conftest import free_port, until

GiB = 1 << 30
CAPACITY = {"device": "cpu", "total_bytes": 16 * GiB, "free_bytes": 12 * GiB, "matmul_gflops": 42.5}
TOKEN = "s3cret-join-token"


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def lost_reasons(caplog, node_id: str) -> list[str]:
    """Why the master dropped `node_id`, from its "worker X (peer) lost: WHY" log lines."""
    prefix = f"worker {node_id} ("
    return [
        m.split(" lost: ", 1)[1] for r in caplog.records if (m := r.getMessage()).startswith(prefix) and " lost: " in m
    ]


class Master:
    """uvicorn on 127.0.0.1 serving /ws/worker; records every frame in and out of the server."""

    def __init__(self, port: int = 0, token: str | None = None, registry: NodeRegistry | None = None, **kw):
        self.registry = registry if registry is not None else NodeRegistry()
        kw.setdefault("heartbeat_interval", 0.1)
        kw.setdefault("heartbeat_timeout", 1.0)
        self.events: list[tuple[str, str]] = []
        self.server = ControlServer(
            self.registry,
            token,
            model_name="tiny",
            on_change=lambda node_id, event: self.events.append((node_id, event)),
            **kw,
        )
        self.frames: list[tuple[str, str | bytes]] = []
        self.port = port

    def _app(self):
        app = FastAPI()
        app.add_api_websocket_route("/ws/worker", self.server.handle)

        async def recorder(scope, receive, send):
            if scope["type"] != "websocket":
                return await app(scope, receive, send)

            async def rec_receive():
                m = await receive()
                if m.get("text") or m.get("bytes"):
                    self.frames.append(("in", m.get("text") or m.get("bytes")))
                return m

            async def rec_send(m):
                if m.get("text") or m.get("bytes"):
                    self.frames.append(("out", m.get("text") or m.get("bytes")))
                await send(m)

            await app(scope, rec_receive, rec_send)

        return recorder

    async def start(self) -> Master:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        cfg = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self.uv = uvicorn.Server(cfg)
        self.task = asyncio.create_task(self.uv.serve(sockets=[sock]))
        await until(lambda: self.uv.started, timeout=10, what="uvicorn start")
        return self

    async def stop(self) -> None:
        self.uv.should_exit = True
        await asyncio.wait_for(self.task, 10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self, node_id: str) -> NodeState | None:
        node = self.registry.get(node_id)
        return node.state if node else None


class FakeWorker:
    """A ControlClient whose 'model load' is a sleep in a thread, like the real worker's.
    Its status reports `mem` (used, free): what it registered with until a load changes it."""

    def __init__(
        self, node_id: str, urls: list[str], token: str | None = None, load_seconds: float = 0.0, fail: bool = False
    ):
        self.load_seconds, self.fail = load_seconds, fail
        self.holding: dict | None = None
        self.loads = 0
        self.assigns: list[Assign] = []
        self.drains: list[str] = []
        self.mem = (CAPACITY["total_bytes"] - CAPACITY["free_bytes"], CAPACITY["free_bytes"])
        self.client = ControlClient(
            urls,
            node_id,
            token,
            self.payload,
            self.on_assign,
            self.on_drain,
            status_payload=self.status,
            backoff_initial=0.05,
            backoff_max=0.2,
        )

    def payload(self) -> dict:
        return {"grpc_address": "127.0.0.1:50051", "capacity": CAPACITY, "holding": self.holding}

    def status(self) -> dict:
        state = "ready" if self.holding else "idle"
        return {
            "state": state,
            "in_flight": 0,
            "steps_done": 7,
            "mem_used_bytes": self.mem[0],
            "mem_free_bytes": self.mem[1],
        }

    async def on_assign(self, a: Assign) -> Ready | Failed:
        self.assigns.append(a)
        t0 = time.monotonic()
        await asyncio.to_thread(time.sleep, self.load_seconds)  # the GIL-free part of a real load
        if self.fail:
            return Failed(plan_id=a.plan_id, reason="out of memory")
        self.loads += 1
        self.mem = (6 * GiB, 10 * GiB)
        self.holding = {
            "model": a.model,
            "start": a.start,
            "end": a.end,
            "num_layers": a.num_layers,
            "num_blocks": a.num_blocks,
            "block_size": a.block_size,
            "dtype": a.dtype,
            "loads": self.loads,
        }
        return Ready(
            plan_id=a.plan_id,
            load_seconds=time.monotonic() - t0,
            mem_used_bytes=6 * GiB,
            mem_free_bytes=10 * GiB,
            loads=self.loads,
        )

    async def on_drain(self, reason: str) -> None:
        self.drains.append(reason)
        self.holding = None

    def start(self) -> FakeWorker:
        self.task = asyncio.create_task(self.client.run())
        return self

    async def stop(self) -> None:
        self.client.stop()
        await asyncio.wait_for(self.task, 5)


def assign(plan_id: int = 1, start: int = 0, end: int = 10) -> Assign:
    return Assign(
        plan_id=plan_id,
        model="tiny",
        start=start,
        end=end,
        num_layers=30,
        num_blocks=64,
        block_size=16,
        dtype="float32",
        next_hop=None,
    )


async def raw_register(url: str, node_id: str, token: str | None = None):
    """A hand-driven worker: challenge, register; returns the socket and the master's reply."""
    ws = await websockets.connect(control_url(url), proxy=None)
    challenge = parse(await ws.recv())
    auth = auth_digest(token, challenge.nonce, node_id) if token else ""
    await ws.send(dump(Register(node_id=node_id, grpc_address="127.0.0.1:1", capacity=CAPACITY, auth=auth)))
    return ws, parse(await ws.recv())


# ---- messages (pure) ----


def test_messages_round_trip_and_refusal_reasons():
    a = assign()
    assert parse(dump(a)) == a
    assert parse(dump(a).encode()) == a
    cases = {
        "x" * (MAX_MESSAGE_BYTES + 1): "exceeds the limit",
        "{": "malformed JSON",
        "[" * 50_000: "malformed JSON",
        "[1]": "expected a JSON object",
        '{"v": 2, "type": "heartbeat", "seq": 1, "sent_at": 0}': "protocol version 2 is not supported",
        '{"type": "heartbeat", "seq": 1, "sent_at": 0}': "protocol version",
        '{"v": 1, "type": "reboot"}': "unknown message type",
        '{"v": 1, "type": "heartbeat", "seq": true, "sent_at": 0}': "invalid heartbeat: seq",
        '{"v": 1, "type": "heartbeat", "seq": 1, "sent_at": NaN}': "malformed JSON",
        '{"v": 1, "type": "heartbeat", "seq": 1, "sent_at": 0, "extra": 1}': "extra",
        json.dumps({**json.loads(dump(a)), "start": 12}): "start < end",
        json.dumps({**json.loads(dump(a)), "next_hop": "nohost"}): "host:port",
    }
    for raw, reason in cases.items():
        with pytest.raises(ProtocolError, match=reason) as e:
            parse(raw)
        assert e.value.close_code == (1009 if "limit" in reason else 1008)
    with pytest.raises(ProtocolError, match="exceeds"):
        dump(Failed(plan_id=1, reason="x" * 2048).model_copy(update={"reason": "y" * 70_000}))


def test_ping_tracker_rtt_and_bounded_memory():
    p = PingTracker(max_pending=3)
    assert p.rtt_ms is None
    assert [p.sent(10.0), p.sent(11.0)] == [1, 2]
    p.acked(2, 11.25)
    assert p.rtt_ms == 250.0 and list(p.pending) == [1]
    p.acked(2, 99.0)  # a duplicate ack counts once
    p.acked(42, 99.0)  # never sent
    assert p.rtt_ms == 250.0
    for t in (12.0, 13.0, 14.0):
        p.sent(t)
    assert list(p.pending) == [3, 4, 5]  # the oldest unanswered ones are forgotten
    p.acked(1, 15.0)
    assert p.rtt_ms == 250.0
    p.acked(3, 12.5)
    assert p.rtt_ms == 500.0
    p.restart()  # a new connection: numbering starts over, the last RTT stays
    assert not p.pending and p.sent(20.0) == 1 and p.rtt_ms == 500.0
    with pytest.raises(ValueError):
        PingTracker(max_pending=0)


def test_control_url():
    assert control_url("http://m:7860") == "ws://m:7860/ws/worker"
    assert control_url("https://m.example/") == "wss://m.example/ws/worker"
    assert control_url("m:7860") == "ws://m:7860/ws/worker"
    assert control_url("ws://m:1/custom") == "ws://m:1/custom"
    for bad in ("ftp://m:1", "garbage", "http://", "http://m:99999", "http://m:0", "http://m:x", "http://[::1", ""):
        with pytest.raises(ValueError, match="master URL must be http"):
            control_url(bad)


# ---- the channel over real sockets ----


def test_register_assign_ready_heartbeat_rtt_and_drain():
    async def main():
        m = await Master().start()
        w = FakeWorker("w1", [m.url], load_seconds=0.3).start()
        await until(lambda: m.state("w1") is NodeState.JOINING, what="register")
        node = m.registry.get("w1")
        assert (node.address, node.device, node.backend, node.model) == ("127.0.0.1:50051", "cpu", "torch", "tiny")
        assert (node.layer_start, node.layer_end) == (0, 0)
        assert (node.mem_used_bytes, node.mem_free_bytes) == (4 * GiB, 12 * GiB)  # from the capacity it registered
        [conn] = m.server.workers()
        assert conn.capacity.matmul_gflops == 42.5 and conn.holding is None
        assert m.events == [("w1", "registered")]

        await m.server.assign("w1", assign(1, 0, 10))
        assert m.state("w1") is NodeState.LOADING
        ready = await m.server.wait_ready("w1", 1, timeout=5)
        assert ready.load_seconds >= 0.3 and ready.loads == 1
        node = m.registry.get("w1")
        assert (node.state, node.layer_start, node.layer_end, node.mem_used_bytes) == (NodeState.READY, 0, 10, 6 * GiB)
        assert ("w1", "ready") in m.events and conn.holding.end == 10

        # Both ends measure the RTT of their own heartbeats (the arithmetic: test_ping_tracker_*).
        await until(
            lambda: m.registry.get("w1").rtt_ms is not None and w.client.rtt_ms is not None, timeout=10, what="RTT"
        )
        assert m.registry.get("w1").rtt_ms >= 0 and w.client.rtt_ms >= 0

        w.mem = (5 * GiB, 11 * GiB)  # status messages update the registry's memory figures
        await until(
            lambda: (m.registry.get("w1").mem_used_bytes, m.registry.get("w1").mem_free_bytes) == (5 * GiB, 11 * GiB),
            timeout=10,
            what="status",
        )

        await m.server.drain("w1", "re-planning")
        await until(lambda: w.drains == ["re-planning"], what="drain")
        node = m.registry.get("w1")
        assert (node.state, node.layer_start, node.layer_end) == (NodeState.JOINING, 0, 0)
        await w.stop()
        await m.stop()

    run(main())


def test_failed_load_raises_and_worker_stays():
    async def main():
        m = await Master().start()
        w = FakeWorker("w1", [m.url], fail=True).start()
        await until(lambda: m.state("w1") is NodeState.JOINING)
        await m.server.assign("w1", assign(3))
        with pytest.raises(LoadFailed, match="out of memory"):
            await m.server.wait_ready("w1", 3, timeout=5)
        assert m.state("w1") is NodeState.JOINING and ("w1", "failed") in m.events
        await w.stop()
        with pytest.raises(WorkerLost):
            await m.server.assign("w1", assign(4))
        await m.stop()

    run(main())


def test_slow_load_is_not_lost():
    async def main():
        m = await Master(heartbeat_interval=0.1, heartbeat_timeout=0.5).start()
        w = FakeWorker("w1", [m.url], load_seconds=1.5).start()  # 3x the heartbeat timeout
        await until(lambda: m.state("w1") is NodeState.JOINING)
        await m.server.assign("w1", assign())
        ready = await m.server.wait_ready("w1", 1, timeout=5)
        assert ready.load_seconds >= 1.5
        assert m.state("w1") is NodeState.READY
        assert [e for _, e in m.events] == ["registered", "ready"]
        await w.stop()
        await m.stop()

    run(main())


def test_silent_workers_lost_even_while_loading(caplog):
    """A worker loads in a thread and keeps beating, so a silent one is gone whatever its state:
    one that goes quiet right after being given layers is dropped within the heartbeat
    timeout, and whoever waits for its ready hears so then (not after the load timeout)."""
    caplog.set_level(logging.INFO, logger="cluster")

    async def main():
        m = await Master(heartbeat_interval=0.1, heartbeat_timeout=0.5).start()
        # A worker that stops answering (a hung process: its socket stays open, nothing is acked).
        ws_idle, reply = await raw_register(m.url, "idle")
        assert reply.type == "registered"
        # One that takes an assignment and goes silent: the attack that stalled re-planning.
        ws_load, _ = await raw_register(m.url, "loader")
        await m.server.assign("loader", assign())
        assert m.state("loader") is NodeState.LOADING
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match="no heartbeat for"):
            await m.server.wait_ready("loader", 1, timeout=600)
        assert time.monotonic() - t0 < 0.5 + 3.0  # the heartbeat timeout (and slack for a busy machine)
        assert m.state("loader") is NodeState.LOST and ("loader", "lost") in m.events
        await until(lambda: m.state("idle") is NodeState.LOST, timeout=10, what="idle worker lost")
        assert ("idle", "lost") in m.events and lost_reasons(caplog, "idle")[0].startswith("no heartbeat for")
        # A worker whose process stops (socket closed) is lost by the close, not by its silence.
        w = FakeWorker("w1", [m.url]).start()
        await until(lambda: m.state("w1") is NodeState.JOINING, timeout=10)
        await w.stop()
        await until(lambda: m.state("w1") is NodeState.LOST, timeout=10, what="stopped worker lost")
        assert ("w1", "lost") in m.events
        assert [r for r in lost_reasons(caplog, "w1") if not r.startswith("no heartbeat")], lost_reasons(caplog, "w1")
        for ws in (ws_idle, ws_load):
            await ws.close()
        await m.stop()

    run(main(), timeout=40)


def test_duplicate_node_id_refused_then_replaces_dead_one():
    async def main():
        m = await Master().start()
        first = FakeWorker("dup", [m.url]).start()
        await first.client.connected.wait()
        second = FakeWorker("dup", [m.url]).start()
        await until(lambda: second.client.last_refusal is not None, what="refusal")
        assert second.client.last_refusal == "node id dup is already connected"
        assert first.client.connected.is_set() and len(m.server.workers()) == 1
        await first.stop()  # the old connection dies: the retrying duplicate now gets in
        await asyncio.wait_for(second.client.connected.wait(), 10)
        assert m.state("dup") is NodeState.JOINING and len(m.server.workers()) == 1
        await second.stop()
        await m.stop()

    run(main())


def test_join_token_checked_by_hmac_and_never_sent(caplog):
    caplog.set_level(logging.INFO, logger="cluster")

    async def main():
        m = await Master(token=TOKEN).start()
        good = FakeWorker("good", [m.url], token=TOKEN).start()
        wrong = FakeWorker("wrong", [m.url], token="not-the-token").start()
        missing = FakeWorker("missing", [m.url], token=None).start()
        await asyncio.wait_for(good.client.connected.wait(), 10)
        await until(lambda: wrong.client.last_refusal and missing.client.last_refusal, what="refusals")
        assert wrong.client.last_refusal == missing.client.last_refusal == "bad join token"
        assert m.state("wrong") is None and m.state("missing") is None
        # Only a worker that proved the token is one the manager could ever give layers to.
        assert [c.node_id for c in m.server.workers()] == ["good"] and not wrong.assigns and not missing.assigns
        for w in (good, wrong, missing):
            await w.stop()
        await m.stop()
        return m

    m = run(main())
    assert m.frames and not any(TOKEN.encode() in (f if isinstance(f, bytes) else f.encode()) for _, f in m.frames)
    registers = [json.loads(f) for d, f in m.frames if d == "in" and '"register"' in f]
    assert any(len(r["auth"]) == 64 for r in registers) and any(r["auth"] == "" for r in registers)
    text = caplog.text
    assert "refused worker wrong from 127.0.0.1:" in text and "bad join token (wrong token)" in text  # master
    assert "refused worker missing from 127.0.0.1:" in text and "bad join token (no token given)" in text
    assert "refused wrong: bad join token" in text  # worker side
    assert "refused missing: bad join token (this worker has no --join-token)" in text


def test_bad_messages_refused_and_logged_server_keeps_serving(caplog):
    caplog.set_level(logging.INFO, logger="cluster")

    async def main():
        m = await Master().start()
        good = FakeWorker("good", [m.url]).start()
        await good.client.connected.wait()
        bad = {
            "x" * (MAX_MESSAGE_BYTES + 10): ("exceeds the limit", 1009),
            "{not json": ("malformed JSON", 1008),
            '{"v": 1, "type": "reboot"}': ("unknown message type", 1008),
            '{"v": 9, "type": "register"}': ("protocol version 9 is not supported", 1008),
            b"\xff\x00binary": ("malformed JSON", 1008),
        }
        for frame, (reason, code) in bad.items():
            async with websockets.connect(control_url(m.url), proxy=None) as ws:
                parse(await ws.recv())  # the challenge
                await ws.send(frame)
                refused = parse(await ws.recv())
                assert refused.type == "refused" and reason in refused.reason
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == code
        # After registering, a message of the wrong direction drops that worker only.
        ws, _ = await raw_register(m.url, "rogue")
        await ws.send(dump(assign()))
        refused = json.loads(await ws.recv())
        while refused["type"] == "heartbeat":
            refused = json.loads(await ws.recv())
        assert refused == {"v": 1, "type": "refused", "reason": "unexpected assign from a worker"}
        await until(lambda: m.state("rogue") is NodeState.LOST, what="rogue dropped")
        await ws.close()
        # The good worker never noticed, and new workers still get in.
        assert good.client.connected.is_set() and m.state("good") is NodeState.JOINING
        other = FakeWorker("other", [m.url]).start()
        await asyncio.wait_for(other.client.connected.wait(), 10)
        for w in (good, other):
            await w.stop()
        await m.stop()

    run(main())
    errors = [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("cluster.control")
    ]
    for needle in (
        "exceeds the limit",
        "malformed JSON",
        "unknown message type",
        "protocol version 9",
        "refused rogue from 127.0.0.1:",
    ):
        assert any(needle in e for e in errors), needle


def test_worker_cap():
    async def main():
        m = await Master(max_workers=1).start()
        w = FakeWorker("w1", [m.url]).start()
        await w.client.connected.wait()
        ws, reply = await raw_register(m.url, "w2")
        assert reply.type == "refused" and reply.reason == "too many workers"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1013 and m.state("w2") is None  # try later
        await w.stop()
        await m.stop()

    run(main())


def test_reconnect_after_master_restart_reports_holding(caplog):
    caplog.set_level(logging.INFO, logger="cluster")

    def waits(records) -> list[float]:  # the delays of the client's "reconnecting ... in X s" lines
        return [r.args[0] for r in records if r.msg == "reconnecting to the master in %.2f s"]

    async def main():
        m = await Master().start()
        w = FakeWorker("w1", [m.url]).start()
        await w.client.connected.wait()
        await m.server.assign("w1", assign(1, 5, 20))
        await m.server.wait_ready("w1", 1, timeout=5)
        await m.stop()
        await until(lambda: not w.client.connected.is_set(), what="disconnect")
        # A few failed reconnects, none of them waiting longer than the backoff cap (0.2 s).
        n0 = len(caplog.records)
        await until(lambda: len(waits(caplog.records[n0:])) >= 3, timeout=10, what="failed reconnects")
        assert all(0 < d <= w.client.backoff_max for d in waits(caplog.records[n0:]))
        m2 = await Master(port=m.port).start()  # a fresh master process: empty registry
        await asyncio.wait_for(w.client.connected.wait(), 10)
        [conn] = m2.server.workers()
        assert (conn.holding.model, conn.holding.start, conn.holding.end, conn.holding.loads) == ("tiny", 5, 20, 1)
        node = m2.registry.get("w1")
        assert (node.state, node.layer_start, node.layer_end) == (NodeState.JOINING, 5, 20)
        m2.server.adopt("w1", plan_id=1)
        assert m2.state("w1") is NodeState.READY
        await w.stop()
        await m2.stop()

    run(main())


def test_several_master_urls_first_unreachable():
    async def main():
        m = await Master().start()
        dead = f"http://127.0.0.1:{free_port()}"
        w = FakeWorker("w1", [dead, m.url]).start()
        await asyncio.wait_for(w.client.connected.wait(), 10)
        assert w.client.master_url == control_url(m.url)
        await w.stop()
        await m.stop()

    run(main())


def test_heartbeat_from_worker_is_acked():
    async def main():
        m = await Master().start()
        ws, _ = await raw_register(m.url, "raw")
        await ws.send(dump(Heartbeat(seq=77, sent_at=time.monotonic())))
        while (msg := parse(await ws.recv())).type != "heartbeat_ack":
            pass
        assert msg.seq == 77
        await ws.close()
        await m.stop()

    run(main())


def test_client_refuses_bad_master_messages_and_retries(caplog):
    caplog.set_level(logging.INFO, logger="cluster")
    from websockets.asyncio.server import serve

    frames = [
        "{garbage",
        "y" * (MAX_MESSAGE_BYTES + 1),
        '{"v": 2, "type": "challenge", "nonce": "00"}',
        '{"v": 1, "type": "registered", "node_id": "w1", "heartbeat_interval": 1, "heartbeat_timeout": 2}',
    ]
    seen: list[int] = []

    async def fake_master(ws):  # one bad first frame per connection, in turn
        seen.append(len(seen))
        await ws.send(frames[min(len(seen) - 1, len(frames) - 1)])
        try:
            await ws.recv()
        except websockets.ConnectionClosed:
            pass

    async def main():
        async with serve(fake_master, "127.0.0.1", 0) as srv:
            port = srv.sockets[0].getsockname()[1]
            w = FakeWorker("w1", [f"http://127.0.0.1:{port}"]).start()
            await until(lambda: len(seen) >= 5, what="retries")
            assert not w.client.connected.is_set()
            await w.stop()

    run(main())
    errors = [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("cluster.control")
    ]
    for needle in (
        "malformed JSON",
        "over 65536 bytes",
        "protocol version 2 is not supported",
        "expected challenge, got registered",
    ):
        assert any(needle in e for e in errors), needle
