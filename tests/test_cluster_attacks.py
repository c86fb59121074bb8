"""The control-channel attacks of issue 12, each tried for real on loopback and refused:

- a tokenless master on a non-loopback address (it refuses to start);
- an idle-socket flood (a real worker still joins, within seconds);
- a worker that takes layers and goes silent (dropped within the heartbeat timeout, and the
  plan goes on without it);
- workers that register and leave by the thousand (the registry stays small);
- a spare worker joining a full `--workers 2` cluster through that flood (no reload, no
  failed request; it steps in when a stage dies);
- a join that is worth a re-plan (requests wait for it instead of failing);
- a worker with a bad --master URL (one line, exit 2).

Sockets come from 127.0.0.0/8 addresses only; a test that passes --host 0.0.0.0 checks
that the master stops before it binds anything."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import websockets

from cluster.control_client import control_url
from cluster.control_guard import PendingSockets, address_key, exposure_error, is_loopback
from cluster.control_messages import parse
from cluster.manager import ClusterManager
from cluster.registry import NodeInfo, NodeRegistry, NodeState
from inference.async_engine import AsyncEngine
from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine
from inference.errors import StageFailure

from .conftest import QUESTIONS, free_port, until
from .test_cluster import Proc, chat, healthy, status, wait_for
from .test_control import FakeWorker, Master, raw_register, run
from .test_manager import CFG, MCFG, NUM_BLOCKS, FakeControl, FakeEngine, FakeRing
from .test_manager import FakeWorker as StubWorker
from .tiny_models import IdTokenizer, make_tiny

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-join-token"


# ---- safe defaults: a master reachable from the network needs a join token ----


def test_loopback_and_exposure_rules():
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and exposure_error(host, None, False) is None
    for host in ("0.0.0.0", "::", "", "10.0.0.2", "myhost.lan"):
        assert not is_loopback(host)
        assert "--join-token" in exposure_error(host, None, False)
        assert exposure_error(host, TOKEN, False) is None and exposure_error(host, None, True) is None
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"  # one host's share
    assert address_key("::ffff:10.0.0.7") == "10.0.0.7"


def app(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGLLM_")}  # no token from outside
    return subprocess.run(
        [sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_tokenless_master_on_a_network_address_refuses_to_start():
    port = free_port()
    t0 = time.monotonic()
    p = app("--host", "0.0.0.0", "--port", str(port), "--no-ui")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--join-token" in p.stderr and "--insecure" in p.stderr
    assert time.monotonic() - t0 < 30  # refused before any model is loaded


def test_insecure_master_warns_loudly():
    """--insecure lets it past the check, with a warning. The port is held on loopback, so
    the master then stops at its port check and never listens on 0.0.0.0."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = app("--host", "0.0.0.0", "--port", str(port), "--insecure", "--no-ui")
    assert p.returncode == 1 and "already in use" in p.stderr, p.stderr
    assert "INSECURE: no --join-token on 0.0.0.0" in p.stderr and "read every prompt" in p.stderr


def test_a_worker_with_a_bad_master_url_says_so_in_one_line():
    for url in ("ftp://x", "garbage"):  # more bad URLs: test_control.py::test_control_url
        p = subprocess.run(
            [sys.executable, "-m", "cluster.worker", "--master", url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: --master: master URL must be http(s)://HOST:PORT")


# ---- the control channel cannot be blocked ----


def test_pending_sockets_shed_the_oldest_over_a_cap():
    async def main():
        pend = PendingSockets(max_total=3, max_per_host=2)
        a1, a2, a3 = (pend.admit("127.0.0.2") for _ in range(3))  # a3 sheds a1: same address
        assert a1.shed.is_set() and "your address" in a1.why and len(pend) == 2 and pend.count("127.0.0.2") == 2
        b1 = pend.admit("127.0.0.3")
        c1 = pend.admit("127.0.0.4")  # over the total: the oldest of all (a2) goes
        assert a2.shed.is_set() and not any(p.shed.is_set() for p in (a3, b1, c1)) and len(pend) == 3
        pend.done(b1)
        pend.expired(c1, 5.0)
        assert len(pend) == 1 and (pend.shed_total, pend.expired_total) == (2, 1)

    asyncio.run(main())


async def idle_socket(url: str, host: str) -> websockets.ClientConnection:
    """An attacker's socket: it completes the WebSocket upgrade, then never says a word."""
    return await websockets.connect(control_url(url), proxy=None, local_addr=(host, 0), open_timeout=5)


async def refusal(ws: websockets.ClientConnection) -> tuple[str | None, int | None]:
    """What the master ends an idle socket with: its `refused` reason and the close code."""
    reason = None
    try:
        async for raw in ws:
            msg = parse(raw)
            if msg.type == "refused":
                reason = msg.reason
    except websockets.ConnectionClosed:
        pass
    return reason, ws.close_code


def test_idle_sockets_are_shed_over_the_caps_or_closed_at_the_deadline():
    async def main():
        m = await Master(handshake_timeout=0.5, max_pending=3, max_pending_per_host=2).start()
        a = [await idle_socket(m.url, "127.0.0.2") for _ in range(3)]
        b = [await idle_socket(m.url, host) for host in ("127.0.0.3", "127.0.0.4")]
        got = await asyncio.gather(*(refusal(ws) for ws in [*a, *b]))
        assert got[0] == ("too many pending connections from your address; try later", 1013)
        assert got[1] == ("too many pending connections; try later", 1013)  # the oldest of all, for the 5th
        assert got[2] == got[3] == got[4] == ("no register in time", 1008)
        assert m.server.pending.shed_total == 2 and m.server.pending.expired_total == 3
        assert len(m.server.pending) == 0 and len(m.registry) == 0
        await m.stop()

    run(main())


FLOOD_HOSTS = ["127.0.0.1"] + [f"127.0.1.{i}" for i in range(1, 16)]  # the first is the workers' own


async def flood(url: str, stop: Callable[[], bool], opened: list[int], per_host: int = 16) -> None:
    """The attack that kept every worker out: idle sockets, 16 from each of FLOOD_HOSTS (256),
    each re-opened a second after the master closes it, until `stop()`."""
    live: set[websockets.ClientConnection] = set()

    async def attacker(host: str) -> None:
        while not stop():
            try:
                ws = await idle_socket(url, host)
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                await asyncio.sleep(0.2)
                continue
            opened[0] += 1
            live.add(ws)
            await ws.wait_closed()
            live.discard(ws)
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(attacker(h)) for h in FLOOD_HOSTS for _ in range(per_host)]
    while not stop():
        await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(asyncio.wait_for(ws.close(), 2) for ws in list(live)), return_exceptions=True)


def test_an_idle_socket_flood_does_not_keep_a_worker_out():
    """Under the flood the master never holds more pending sockets than its caps, none of
    them ever registers, and a real worker (from a flooding address, too) joins in seconds."""

    async def main():
        m = await Master().start()  # the defaults: 8 pending per address, 64 in all, 5 s to register
        stop, opened, peak = [False], [0], [0, 0]
        attack = asyncio.create_task(flood(m.url, lambda: stop[0], opened))

        async def sample() -> None:
            while not stop[0]:
                peak[0] = max(peak[0], len(m.server.pending))
                peak[1] = max(peak[1], max(m.server.pending.count(h) for h in FLOOD_HOSTS))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            await until(lambda: opened[0] >= 256, timeout=30, what="the flood to open its sockets")
            t0 = time.monotonic()
            worker = FakeWorker("w1", [m.url]).start()
            await until(lambda: worker.client.connected.is_set(), timeout=10, what="the worker to get in")
            joined = time.monotonic() - t0
            await asyncio.sleep(1.0)  # the flood goes on; the worker stays
            assert [c.node_id for c in m.server.workers()] == ["w1"] and worker.client.connected.is_set()
            assert peak[0] <= 64 and peak[1] <= 8 and m.server.pending.shed_total > 0, (peak, joined)
            await worker.stop()
        finally:
            stop[0] = True
            await asyncio.gather(attack, sampler, return_exceptions=True)
            await m.stop()

    run(main(), timeout=90)


def test_departed_workers_leave_the_registry():
    """Thousands of registrations used to leave a row each, forever; now at most
    `max_departed` departed rows stay, and none past `departed_ttl`."""

    async def main():
        registry = NodeRegistry(max_departed=8, departed_ttl=3.0)
        m = await Master(registry=registry).start()
        live = FakeWorker("live", [m.url]).start()
        await live.client.connected.wait()
        for i in range(100):
            ws, reply = await raw_register(m.url, f"drive-by-{i}")
            assert reply.type == "registered"
            await ws.close()
        await until(lambda: not m.server.workers()[1:], what="the drive-bys to be dropped")
        await until(lambda: all(n.state is NodeState.LOST for n in registry.snapshot() if n.node_id != "live"))
        assert 1 < len(registry) <= 1 + 8 and registry.get("live").state is NodeState.JOINING
        size = len(json.dumps([n.node_id for n in registry.snapshot()]))
        assert size < 400
        await until(lambda: len(registry) == 1, timeout=10, what="departed rows to age out")
        assert registry.get("live") is not None
        await live.stop()
        await m.stop()

    run(main(), timeout=60)


def test_registry_bounds_departed_rows_and_forgets_old_ones():
    r = NodeRegistry(max_departed=2, departed_ttl=10.0)

    def node(i: int, state: NodeState, t: float) -> NodeInfo:
        return NodeInfo(f"n{i}", "127.0.0.1:1", "torch", "cpu", "m", 0, 0, 0, 0, state, t)

    for i in range(4):
        r.add(node(i, NodeState.JOINING, float(i)))
    for i in range(4):
        r.update(f"n{i}", state=NodeState.LOST)
    assert [n.node_id for n in r.snapshot()] == ["n2", "n3"]  # the two seen last
    r.add(node(9, NodeState.READY, 0.0))
    assert r.prune(12.5) == ["n2"] and [n.node_id for n in r.snapshot()] == ["n3", "n9"]  # live rows stay
    with pytest.raises(ValueError):
        NodeRegistry(max_departed=-1)


# ---- a worker that takes layers and goes silent ----


def test_a_worker_silent_after_its_assignment_is_dropped_and_the_plan_goes_on():
    async def main():
        m = await Master(heartbeat_interval=0.2, heartbeat_timeout=1.0).start()
        engine = FakeEngine()
        mgr = ClusterManager(
            engine,
            m.server,
            SimpleNamespace(port=7000, results=0, errors=0),
            CFG,
            MCFG,
            "local-runner",
            NUM_BLOCKS,
            want_workers=2,
            make_engine=lambda runner: SimpleNamespace(runner=runner),
            connect=FakeRing,
        )
        m.server.on_change = lambda node_id, event: mgr.poke()
        silent, reply = await raw_register(m.url, "silent")  # first to join: it is in the first plan
        assert reply.type == "registered"
        w1 = FakeWorker("w1", [m.url]).start()
        await w1.client.connected.wait()
        mgr.start()
        await until(lambda: m.state("silent") is NodeState.LOADING, what="the silent worker's assignment")
        t0 = time.monotonic()
        w2 = FakeWorker("w2", [m.url]).start()  # its replacement
        await until(lambda: engine.ready, timeout=10, what="a plan without the silent worker")
        assert time.monotonic() - t0 < 1.0 + 5.0  # the heartbeat timeout (and slack), not the 600 s load timeout
        assert m.state("silent") is NodeState.LOST
        assert sorted(a.node_id for a in mgr.plan.assignments) == ["w1", "w2"]
        await silent.close()
        for w in (w1, w2):
            await w.stop()
        await m.stop()

    run(main(), timeout=30)


# ---- joining a serving cluster: no reload unless it pays, and then requests wait ----


class StageRunner:
    """A 'pipeline' over the master's own model whose stages break when they are told to
    reload (as a real worker drops its layers on an assign): a step on it then fails."""

    def __init__(self, inner):
        self.inner, self.broken, self.steps_after_break = inner, False, 0

    def prepare(self, batch):
        if self.broken:
            self.steps_after_break += 1
            raise StageFailure("stage reloading")
        return self.inner.prepare(batch)

    def forward(self, inputs, hidden=None):
        return self.inner.forward(inputs, hidden)

    def logits(self, inputs, hidden):
        return self.inner.logits(inputs, hidden)

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_requests_wait_through_a_join_replan_and_none_fails(tmp_path):
    make_tiny("llama-tied", tmp_path)
    cfg = EngineConfig(model=str(tmp_path), max_batch=4, kv_cache_gb=0.01, max_batch_tokens=64)
    engine = Engine(cfg, tokenizer=IdTokenizer())
    local = engine.runner
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(3, 11)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [toks for toks, _, _ in engine.generate(prompts, greedy)]
    runners: list[StageRunner] = []

    def connect(first: str, reply_to: str) -> StageRunner:
        runners.append(StageRunner(local))
        return runners[-1]

    def on_assign(node_id: str) -> None:  # the serving pipeline's stages reload now
        for r in runners:
            r.broken = True

    control = FakeControl([StubWorker("slow", gflops=0.01)], on_assign=on_assign)

    async def main():
        aengine = AsyncEngine(engine, "tiny")
        aengine.start()
        mgr = ClusterManager(
            aengine,
            control,
            SimpleNamespace(port=7000, results=0, errors=0),
            cfg,
            engine.loaded.config,
            local,
            engine.kv.pool.num_blocks,
            connect=connect,
        )
        await mgr._replan()
        await until(lambda: aengine.ready, what="the first pipeline")

        async def client(i: int) -> list[list[int]]:
            got = []
            for j in range(4):
                toks: list[int] = []
                async for out in aengine.generate(prompts[(i + j) % len(prompts)], greedy):
                    toks += out.token_ids
                got.append(toks)
            return got

        clients = [asyncio.create_task(client(i)) for i in range(6)]
        await asyncio.sleep(0.05)  # requests in flight
        control.workers_.append(StubWorker("fast", gflops=100.0, free_bytes=24 * 2**30))
        await mgr._replan()  # worth it: the fast worker takes 3 of the 4 layers
        results = await asyncio.gather(*clients)
        await aengine.shutdown()
        return results

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert control.assigned_to == ["slow", "slow", "fast"] and len(runners) == 2
    assert runners[0].broken and runners[0].steps_after_break == 0  # nothing ran on the reloading stages
    for i, got in enumerate(results):
        assert got == [expected[(i + j) % len(prompts)] for j in range(4)]


@pytest.mark.slow
def test_a_spare_worker_joins_a_full_cluster_through_a_flood_with_no_reload_and_no_failed_request(tmp_path):
    """A real `--workers 2` cluster serving greedy chats; a third worker joins while the
    control channel is flooded with idle sockets. It gets in, stands by (the plan and every
    worker's load count stay as they were), and every chat succeeds with the same text each
    time. When a stage dies the standby replaces it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    master_args = ["app.py", "--no-ui", "--port", str(port), "--workers", "2", "--quant", "none"]
    master_args += ["--join-token", TOKEN, "--kv-cache-gb", "0.1", "--max-batch", "8"]
    procs = {"master": Proc(master_args, tmp_path / "master.log")}

    def worker(name: str) -> Proc:
        args = ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--node-id", name]
        return Proc(args, tmp_path / f"{name}.log")

    stop, failures, answers, opened = [False], [], [], [0]
    try:
        procs.update(w1=worker("w1"), w2=worker("w2"))
        wait_for(lambda: healthy(base), 240, "the cluster to serve", list(procs.values()))
        before = status(base)["cluster"]

        def client(i: int) -> None:
            while not stop[0]:
                q = QUESTIONS[(i + len(answers)) % 4]
                try:
                    answers.append((q, chat(base, q, max_tokens=8)))
                except AssertionError as e:
                    failures.append(str(e))

        attack = threading.Thread(target=lambda: asyncio.run(flood(base, lambda: stop[0], opened)), daemon=True)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(client, i) for i in range(3)]
            attack.start()
            wait_for(lambda: opened[0] >= 256, 60, "the flood", list(procs.values()))
            procs["w3"] = worker("w3")
            wait_for(
                lambda: (s := status(base)) and s["cluster"]["standby"] == ["w3"],
                120,
                "w3 to get in and stand by",
                list(procs.values()),
            )
            n = len(answers)
            wait_for(lambda: len(answers) >= n + 6, 120, "requests after the join", list(procs.values()))
            stop[0] = True
            for f in busy:
                f.result()
            attack.join(30)
        after = status(base)["cluster"]
        assert not failures, failures[:3]
        texts = {q: {a for qq, a in answers if qq == q} for q, _ in answers}
        assert all(len(t) == 1 for t in texts.values()), texts  # greedy: the same text every time
        assert after["plan"] == before["plan"] and after["loads"] == before["loads"] == {"w1": 1, "w2": 1}
        assert "plan 2" not in procs["master"].text()  # no second plan: nothing reloaded
        assert "worker(s) w3 stand by: the cluster has its 2 worker(s)" in procs["master"].text()
        procs["w1"].p.kill()  # now it is needed: the standby replaces the lost stage
        wait_for(
            lambda: (s := status(base)) and s["ready"] and "w1" not in str(s["cluster"]["plan"]),
            120,
            "the standby to take over",
            list(procs.values()),
        )
        assert sorted(a["node_id"] for a in status(base)["cluster"]["plan"]["assignments"]) == ["w2", "w3"]
        q, text = answers[0]
        assert chat(base, q, max_tokens=8) == text
    finally:
        stop[0] = True
        for p in procs.values():
            p.stop()
