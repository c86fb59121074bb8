"""The data plane under attack, over real gRPC on loopback: two stage servers of a tiny model
and the master's result endpoint, driven by a pipeline Engine. A stranger (no credentials,
wrong ones, or another plan's) can neither drive a stage nor settle or fail a step; a result
counts only from the plan's last stage, in the shape that was sent; a step over the plan's
limits is refused with a clear error and the stage goes on serving. Each attack runs next to
(or before) a greedy generation that must equal the single-process one."""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading

import grpc
import pytest
import torch

from cluster.control_messages import Assign, dump, parse
from cluster.data_auth import AUTH_HEADER, NODE_HEADER, PlanAuth, RefusalLog, StageKeys, unwrap_keys, wrap_keys
from cluster.stage_server import StageServicer, serve
from cluster.stage_stream import GRPC_OPTIONS, StageError
from cluster.tensor_wire import encode_step, to_proto
from proto import stage_pb2, stage_pb2_grpc

from .conftest import ROOT
from .tiny_models import TINY
from .tiny_ring import BLOCK, GREEDY, tiny_ring

HIDDEN = TINY["hidden_size"]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """Stage s1 [0, 2) → stage s2 [2, 4) → the master's result endpoint, all in this process
    on real gRPC servers; `engine` generates through them, `expected` is the single-process answer."""
    with tiny_ring(str(tmp_path_factory.mktemp("tiny"))) as r:
        yield r


def generate(ring) -> list[list[int]]:
    return [g[0] for g in ring.engine.generate(ring.prompts, GREEDY)]


class Stream:
    """One persistent stream on its own channel, driven a message at a time: send, then read
    its answer. `kind`: "steps" (a stage's Stage.Steps) or "results" (the master's Master.Results)."""

    def __init__(self, address: str, kind: str, metadata=()):
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        stub = stage_pb2_grpc.StageStub(self._channel) if kind == "steps" else stage_pb2_grpc.MasterStub(self._channel)
        call = stub.Steps if kind == "steps" else stub.Results
        self._q: queue.Queue = queue.Queue()
        self._answers = call(iter(self._q.get, None), metadata=tuple(metadata), timeout=30)

    def send(self, msg):
        self._q.put(msg)
        return next(self._answers)

    def close(self) -> None:
        self._q.put(None)
        self._channel.close()


def refused(address: str, kind: str, metadata, msg) -> grpc.StatusCode | None:
    """The status a one-message stream ends with (None: the message was answered)."""
    stream = Stream(address, kind, metadata)
    try:
        stream.send(msg)
    except grpc.RpcError as e:
        return e.code()
    finally:
        stream.close()
    return None


def step(
    n_seqs: int = 1, q: int = 1, ctx: int = 1, width: int = HIDDEN, slots: int = 0, reply_to: str = ""
) -> stage_pb2.StepRequest:
    """A schema-valid step of `n_seqs` sequences with `q` new tokens each over `ctx` context."""
    t = n_seqs * q
    req = encode_step(
        0,
        torch.randn(t, width),
        torch.arange(ctx - q, ctx).repeat(n_seqs),
        torch.full((t,), slots, dtype=torch.long),
        torch.zeros(n_seqs, -(-ctx // BLOCK), dtype=torch.long),
        [q] * n_seqs,
        [ctx] * n_seqs,
        n_seqs if q == 1 else 0,
        BLOCK,
    )
    req.reply_to = reply_to
    return req


def stranger_credentials(plan: PlanAuth) -> dict[str, tuple]:
    other = PlanAuth(plan.stages)  # the same stage names under another secret
    return {
        "none": (),
        "garbage": ((AUTH_HEADER, "0" * 64), (NODE_HEADER, plan.last)),
        "another plan's": other.stage_keys(plan.last).results_metadata(plan.last) + other.steps_metadata(),
    }


# ---- authentication -----------------------------------------------------------------------


def test_a_strangers_step_is_refused_before_the_stage_reads_it(ring):
    s1 = ring.stages["s1"]
    before = (s1.steps_done, ring.results.results)
    for name, md in stranger_credentials(ring.plan).items():
        # It would write KV slot 0 and send the activations on: refused, nothing runs.
        code = refused(ring.first, "steps", md, step(reply_to=ring.reply_to))
        assert code == UNAUTHENTICATED, name
    ping = stage_pb2.StepRequest(step_id=1, ping=True)
    assert refused(ring.first, "steps", (), ping) == UNAUTHENTICATED  # not even a ping
    assert (s1.steps_done, ring.results.results) == before and s1.refused >= 4
    # Health stays open and says what it always did: no keys, no plan.
    with grpc.insecure_channel(ring.first) as channel:
        health = stage_pb2_grpc.StageStub(channel).Health(stage_pb2.HealthRequest(), timeout=10)
    assert health.ready and health.node_id == "s1"
    assert generate(ring) == ring.expected


def test_a_stage_without_a_plan_admits_nobody():
    servicer = StageServicer("idle")
    server, port = serve(servicer, "127.0.0.1", 0)
    try:
        md = PlanAuth(["idle"]).steps_metadata()
        assert refused(f"127.0.0.1:{port}", "steps", md, stage_pb2.StepRequest(ping=True)) == UNAUTHENTICATED
    finally:
        server.stop(grace=None)


def test_forged_results_and_errors_are_refused_during_a_live_generation(ring):
    """The attacker even knows the live step ids (read from the master's table, the worst
    case): without the last stage's credentials that is not enough."""
    stop, codes = threading.Event(), []
    strangers = stranger_credentials(ring.plan)
    # The steps key opens Steps streams, not the master's result endpoint.
    posing = dict(strangers, steps_key=ring.plan.steps_metadata() + ((NODE_HEADER, "s2"),))

    def attack() -> None:
        while not stop.is_set():
            live = list(ring.results._waiting) or [1, 2, 3]
            for md in posing.values():
                for sid in live:
                    forged = stage_pb2.StepResponse(step_id=sid, hidden=to_proto(torch.zeros(1, 7)))
                    codes.append(refused(ring.reply_to, "results", md, forged))
                    error = stage_pb2.StepResponse(step_id=sid, error="forged: stage died")
                    codes.append(refused(ring.reply_to, "results", md, error))
            for md in strangers.values():  # and a step that would overwrite KV blocks in use
                codes.append(refused(ring.first, "steps", md, step(slots=3, reply_to=ring.reply_to)))

    before, errors = ring.results.refused, ring.results.errors
    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        got = generate(ring)
    finally:
        stop.set()
        attacker.join(30)
    assert got == ring.expected
    assert codes and set(codes) == {UNAUTHENTICATED}
    assert ring.results.refused > before and ring.results.errors == errors


def test_a_result_counts_only_from_the_last_stage_and_an_error_from_any(ring):
    results, plan = ring.results, ring.plan
    s1 = Stream(ring.reply_to, "results", plan.stage_keys("s1").results_metadata("s1"))
    s2 = Stream(ring.reply_to, "results", plan.stage_keys("s2").results_metadata("s2"))
    # A stage's key is its own: s1's key does not make it s2.
    assert (
        refused(
            ring.reply_to,
            "results",
            plan.stage_keys("s1").results_metadata("s2"),
            stage_pb2.StepResponse(step_id=1, error="x"),
        )
        == UNAUTHENTICATED
    )
    sid, fut = results.expect(plan, 2, HIDDEN)
    good = stage_pb2.StepResponse(step_id=sid, hidden=to_proto(torch.ones(2, HIDDEN)))
    assert "only the last stage" in s1.send(good).error and not fut.done()
    assert s2.send(stage_pb2.StepResponse(step_id=12345, error="x")).error  # no such step: refused
    assert not s2.send(good).error and torch.equal(fut.result(1), torch.ones(2, HIDDEN))
    assert s2.send(good).error  # settled once: a replay is refused
    sid, fut = results.expect(plan, 1, HIDDEN)
    assert not s1.send(stage_pb2.StepResponse(step_id=sid, error="s1: out of memory")).error
    with pytest.raises(StageError, match="out of memory"):
        fut.result(1)
    s1.close()
    s2.close()


def test_a_wrong_shape_result_fails_only_its_step(ring):
    results, plan = ring.results, ring.plan
    s2 = Stream(ring.reply_to, "results", plan.stage_keys("s2").results_metadata("s2"))
    bad = [torch.zeros(1, 7), torch.zeros(3, HIDDEN + 1), torch.zeros(3, HIDDEN, dtype=torch.int64), torch.zeros(3)]
    for hidden in bad:
        sid, fut = results.expect(plan, 3, HIDDEN)
        ack = s2.send(stage_pb2.StepResponse(step_id=sid, hidden=to_proto(hidden)))
        assert "malformed result" in ack.error
        with pytest.raises(StageError, match=r"malformed result: hidden states .* expected \[3, 64\]"):
            fut.result(1)
    sid, fut = results.expect(plan, 3, HIDDEN)  # the same stream goes on
    assert not s2.send(stage_pb2.StepResponse(step_id=sid, hidden=to_proto(torch.ones(3, HIDDEN)))).error
    assert fut.result(1).shape == (3, HIDDEN)
    s2.close()
    assert generate(ring) == ring.expected  # and so does the ring


# ---- validation at the stage ----------------------------------------------------------------

OVER_LIMITS = {
    # the 0.6 MiB step: 64 sequences x 16,384 context
    "64 sequences x 16k context": (dict(n_seqs=64, ctx=16384), "64 sequences in one step, over this plan's budget"),
    "one context longer than the model's": (dict(ctx=4096), "a context of 4096 tokens, over this stage's 512"),
    "more context than the KV pool": (dict(n_seqs=8, ctx=200), "1600 context tokens in one step, over this plan's"),
    "more new tokens than the batch": (dict(q=65, ctx=65), "65 new tokens in one step, over this plan's budget"),
    "a hidden width of 7": (dict(width=7), "hidden width 7, this model's hidden size is 64"),
}


@pytest.mark.parametrize("case", OVER_LIMITS)
def test_a_step_over_the_plans_limits_is_refused_and_the_stage_keeps_serving(ring, case):
    kwargs, why = OVER_LIMITS[case]
    s1 = ring.stages["s1"]
    before = s1.steps_done
    req = step(**kwargs, reply_to=ring.reply_to)
    sid, fut = ring.results.expect(ring.plan, 1, HIDDEN)  # the stage reports its refusal to the master too
    req.step_id = sid
    stream = Stream(ring.first, "steps", ring.plan.steps_metadata())
    ack = stream.send(req)
    stream.close()
    assert ack.error.startswith("malformed step: ") and why in ack.error, ack.error
    with pytest.raises(StageError, match="s1: malformed step"):
        fut.result(10)
    assert s1.steps_done == before
    assert generate(ring) == ring.expected


def test_a_step_with_an_int_hidden_state_is_refused(ring):
    req = step(reply_to=ring.reply_to)
    req.hidden.CopyFrom(to_proto(torch.zeros(1, HIDDEN, dtype=torch.int64)))
    stream = Stream(ring.first, "steps", ring.plan.steps_metadata())
    ack = stream.send(req)
    stream.close()
    assert "hidden must be a 2-D float tensor" in ack.error


# ---- the keys on the control channel ----------------------------------------------------------


def assign(**keys) -> Assign:
    shard = dict(model="m", start=0, end=2, num_layers=4, num_blocks=8, block_size=16, dtype="float32")
    return Assign(plan_id=1, **shard, **keys)


def test_keys_cross_the_control_channel_wrapped_with_the_join_token():
    keys = PlanAuth(["w1", "w2"]).stage_keys("w2")
    msg = parse(dump(assign(**wrap_keys(keys, "w2", "join-token"))))
    assert isinstance(msg, Assign) and msg.keys_wrapped
    text = dump(msg)
    assert keys.steps.hex() not in text and keys.result.hex() not in text  # never in clear
    fields = (msg.steps_key, msg.result_key, msg.key_nonce, msg.keys_wrapped)
    assert unwrap_keys(*fields, "w2", "join-token") == keys
    assert unwrap_keys(*fields, "w2", "wrong-token") != keys  # useless: its streams would be refused
    assert unwrap_keys(*fields, "w1", "join-token") != keys  # bound to the node it was sent to
    with pytest.raises(ValueError, match="has none"):
        unwrap_keys(*fields, "w2", None)
    # Two assigns of the same keys use fresh pads.
    assert wrap_keys(keys, "w2", "join-token")["steps_key"] != msg.steps_key
    # No join token: the channel admits anyone anyway, so the keys go as they are.
    plain = wrap_keys(keys, "w2", None)
    assert unwrap_keys(plain["steps_key"], plain["result_key"], "", False, "w2", None) == keys
    with pytest.raises(ValueError, match="no data-plane keys"):
        unwrap_keys("", "", "", False, "w2", None)


def test_stage_keys_are_per_node_and_per_secret():
    a = StageKeys.from_secret(b"s" * 16, "n1")
    assert a == StageKeys.from_secret(b"s" * 16, "n1")
    assert a.steps == StageKeys.from_secret(b"s" * 16, "n2").steps  # one steps key per plan
    assert a.result != StageKeys.from_secret(b"s" * 16, "n2").result  # a result key per stage
    assert a != StageKeys.from_secret(b"t" * 16, "n1")
    with pytest.raises(ValueError, match="at least 16"):
        StageKeys.from_secret(b"short", "n1")


def test_a_hand_run_stage_refuses_to_start_without_a_secret():
    env = {k: v for k, v in os.environ.items() if k != "RINGLLM_SECRET"}
    r = subprocess.run(
        [sys.executable, "-m", "cluster.stage_server", "--layers", "0", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "data-plane secret" in r.stderr and "Traceback" not in r.stderr


def test_a_flood_of_refusals_is_one_log_line_per_interval(caplog):
    warn = RefusalLog(logging.getLogger("test.refusals"), interval=60)
    with caplog.at_level(logging.WARNING, "test.refusals"):
        for i in range(100):
            warn("refused a stream from %s", f"peer{i}")
    assert [r.getMessage() for r in caplog.records] == ["refused a stream from peer0"]
    warn.interval = 0
    with caplog.at_level(logging.WARNING, "test.refusals"):
        warn("refused a stream from %s", "peer100")
    assert caplog.records[-1].getMessage() == "refused a stream from peer100 (and 99 more refused before it)"
