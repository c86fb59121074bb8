"""The cluster as users run it: a real master (`python app.py --workers 2`) and real
workers (`python -m cluster.worker`) on loopback, over WebSocket control and gRPC."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import QUESTIONS, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-join-token"
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


class Proc:
    """A subprocess whose output goes to a log file we can read back on failure."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.p = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def wait_for(pred, timeout: float, what: str, procs: list[Proc] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.log.name}\n{p.text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def status(base: str) -> dict | None:
    try:
        return httpx.get(f"{base}/api/status", timeout=2).json()
    except httpx.HTTPError:
        return None


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def chat(base: str, question: str, max_tokens: int = 24) -> str:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json=dict(messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens),
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    master_args = [
        "app.py",
        "--no-ui",
        "--port",
        str(port),
        "--workers",
        "2",
        "--quant",
        "none",
        "--join-token",
        TOKEN,
        "--kv-cache-gb",
        "0.1",
        "--max-batch",
        "8",
    ]
    procs = {"master": Proc(master_args, logs / "master.log")}
    for name in ("w1", "w2"):
        procs[name] = Proc(
            ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--node-id", name], logs / f"{name}.log"
        )
    wait_for(lambda: healthy(base), 180, "the cluster to serve", list(procs.values()))
    state = dict(base=base, procs=procs, logs=logs, master_args=master_args)
    yield state
    for p in state["procs"].values():
        p.stop()


def test_two_workers_equal_single_process_for_8_concurrent_requests(cluster, expected):
    s = status(cluster["base"])
    assert s["cluster"]["mode"] == "pipeline"
    assert [(a["node_id"], a["start"], a["end"]) for a in s["cluster"]["plan"]["assignments"]] in (
        [("w1", 0, 15), ("w2", 15, 30)],
        [("w2", 0, 15), ("w1", 15, 30)],
    )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: chat(cluster["base"], q), QUESTIONS))
    assert got == expected
    ring = status(cluster["base"])["cluster"]["ring"]  # the last stage answered the master directly
    assert ring["results"] > 0 and ring["errors"] == 0


def test_wrong_join_token_is_refused(cluster, tmp_path):
    intruder = Proc(
        ["-m", "cluster.worker", "--master", cluster["base"], "--join-token", "wrong", "--node-id", "intruder"],
        tmp_path / "intruder.log",
    )
    try:
        wait_for(lambda: "bad join token" in intruder.text(), 60, "the refusal", [intruder])
    finally:
        intruder.stop()
    assert "intruder" not in [n["node_id"] for n in status(cluster["base"])["nodes"]]
    assert "wrong token" in cluster["procs"]["master"].text()


def test_a_strangers_data_plane_traffic_is_refused_during_a_chat(cluster, expected):
    """Issue 12's data-plane attacks on the real processes: forged results and errors sent
    to the master's result endpoint (for the step ids a counter would have used) and a
    stranger's step to each worker (it would write KV blocks in use), all while a greedy
    chat runs: each is refused before it is read, and the chat gives the same text."""
    import grpc

    from proto import stage_pb2

    from .test_data_plane import refused, step

    base = cluster["base"]
    s = status(base)
    results = f"127.0.0.1:{s['cluster']['ring']['port']}"
    stages = [n["address"] for n in s["nodes"] if n["state"] == "ready" and n["node_id"] != "master"]
    assert len(stages) == 2
    codes: list = []
    stop = False

    def attack() -> None:
        n = 0
        while not stop:
            n += 1
            for md in ((), (("x-ringllm-auth", "0" * 64), ("x-ringllm-node", "w2"))):
                forged = stage_pb2.StepResponse(step_id=n, error="forged: the stage died")
                codes.append(refused(results, "results", md, forged))
                forged = stage_pb2.StepResponse(step_id=n, hidden=stage_pb2.Tensor(dtype="float32", shape=[1, 7]))
                codes.append(refused(results, "results", md, forged))
                for address in stages:
                    codes.append(refused(address, "steps", md, step(width=576, slots=n % 64, reply_to=results)))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        attacker = pool.submit(attack)
        try:
            got = chat(base, QUESTIONS[3])
        finally:
            stop = True
        attacker.result()
    assert got == expected[3]
    assert codes and set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    ring = status(base)["cluster"]["ring"]
    assert ring["errors"] == 0 and healthy(base)


def test_master_restart_adopts_workers_without_reload(cluster, expected):
    base, procs = cluster["base"], cluster["procs"]
    procs["master"].stop()
    procs["master"] = Proc(cluster["master_args"], cluster["logs"] / "master2.log")
    wait_for(lambda: healthy(base), 120, "the restarted master to serve", list(procs.values()))
    loads = status(base)["cluster"]["loads"]
    assert loads == {"w1": 1, "w2": 1}  # each worker loaded its layers once, before the restart
    assert chat(base, QUESTIONS[0]) == expected[0]


def test_killed_worker_ends_the_request_and_a_new_one_restores_service(cluster, expected):
    base, procs = cluster["base"], cluster["procs"]
    body = dict(
        messages=[{"role": "user", "content": "Write a long story about a castle."}],
        temperature=0,
        max_tokens=400,
        stream=True,
    )
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:  # a few tokens in, kill the second stage
            if line.startswith("data:") and '"content"' in line:
                break
        procs["w2"].p.kill()
        rest = [line for line in lines]  # the client's 60 s read timeout only guards against a hang
    events = [json.loads(x[5:]) for x in rest if x.startswith("data:") and x.strip() != "data: [DONE]"]
    assert any("error" in e for e in events) or any(
        c.get("finish_reason") == "error" for e in events for c in e.get("choices", [])
    )
    # The master failed the request because it saw the stage die (a broken stream), not because
    # a step went unanswered until the ring's timeout ("no result for step N within 10 s").
    failures = re.findall(r"pipeline step failed: (.*); failing \d+ requests", procs["master"].text())
    assert failures, procs["master"].text()[-3000:]
    assert not any(re.search(r"no result for step \d+ within", f) for f in failures), failures
    assert healthy(base) is False and status(base) is not None  # the master is up, waiting
    wait_for(
        lambda: any(n["node_id"] == "w2" and n["state"] == "lost" for n in status(base)["nodes"]),
        30,
        "w2 to show as lost",
        list(procs.values()),
    )
    procs["w3"] = Proc(
        ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--node-id", "w3"], cluster["logs"] / "w3.log"
    )
    wait_for(lambda: healthy(base), 120, "service with the replacement worker", list(procs.values()))
    assert chat(base, QUESTIONS[1]) == expected[1]
    # The broken pipeline's gRPC channel was closed, not left to the garbage collector.
    assert "closed the stage channel of the replaced pipeline" in procs["master"].text()


def worker(base: str, name: str, logs: Path) -> Proc:
    """A real worker joining `base` with the test token, logging to logs/NAME.log."""
    return Proc(
        ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--node-id", name], logs / f"{name}.log"
    )


def test_a_killed_stage_fails_the_running_request_and_serves_the_queued_one_after_a_replacement(tmp_path, expected):
    """Issue 12's fault test, with real processes: one batch slot, so request A runs (streaming)
    while B waits in the queue; a stage is killed. A ends with a clear error at once; B waits,
    is served once a replacement worker has joined and loaded, and gets the single-process text."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    master_args = ["app.py", "--no-ui", "--port", str(port), "--workers", "2", "--quant", "none"]
    master_args += ["--join-token", TOKEN, "--kv-cache-gb", "0.1", "--max-batch", "1", "--unavailable-wait", "600"]
    procs = {"master": Proc(master_args, tmp_path / "master.log")}
    procs.update(w1=worker(base, "w1", tmp_path), w2=worker(base, "w2", tmp_path))
    body = dict(
        messages=[{"role": "user", "content": "Write a long story about a castle."}],
        temperature=0,
        max_tokens=400,
        stream=True,
    )
    queued_body = dict(messages=[{"role": "user", "content": QUESTIONS[4]}], temperature=0, max_tokens=24)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        wait_for(lambda: healthy(base), 240, "the cluster to serve", list(procs.values()))
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:  # A runs: a few tokens in ...
                if line.startswith("data:") and '"content"' in line:
                    break
            # ... B arrives and waits for the one batch slot (a timeout long enough for a worker to load)
            queued = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=queued_body, timeout=600)
            wait_for(lambda: (s := status(base)) and s["waiting"] == 1, 60, "B to queue", list(procs.values()))
            assert status(base)["running"] == 1
            procs["w2"].p.kill()
            rest = list(lines)  # A's stream ends (the client's 60 s timeout only guards against a hang)
            errors = [
                e["error"]
                for x in rest
                if x.startswith("data:") and "[DONE]" not in x and "error" in (e := json.loads(x[5:]))
            ]
            assert len(errors) == 1 and errors[0]["code"] == "engine_unavailable", rest[-3:]
            assert "stage" in errors[0]["message"], errors
            # B has produced nothing: it is not failed with A but waits for the cluster to recover.
            wait_for(
                lambda: any(n["node_id"] == "w2" and n["state"] == "lost" for n in status(base)["nodes"]),
                30,
                "w2 to show as lost",
                list(procs.values()),
            )
            s = status(base)
            assert not queued.done() and s["waiting"] == 1 and s["running"] == 0 and not s["ready"]
            procs["w3"] = worker(base, "w3", tmp_path)
            reply = queued.result(timeout=600)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected[4]
        plan = status(base)["cluster"]["plan"]
        assert sorted(a["node_id"] for a in plan["assignments"]) == ["w1", "w3"]
        master = procs["master"].text()
        assert re.search(r"pipeline step failed: .*; failing 1 requests", master), master[-3000:]
        assert "1 queued requests wait up to 600 s" in master
    finally:
        for p in procs.values():
            p.stop()
        pool.shutdown()  # after the master: B's request cannot outlive it
