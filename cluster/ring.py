"""The master's end of the ring: master → stage 1 → … → stage N → master.

`ResultServer` is a small gRPC server on the master (`Master.Results`): the last stage
sends each step's final hidden states there, and any stage that fails a step reports it
there, so an answer costs N+1 hops instead of 2N. `RingClient` is what the PipelineRunner
talks to: `step()` sends a step to stage 1 without waiting for stage 1's answer and waits
on the step's future instead, with a timeout.

Both ends are guarded (cluster.data_auth): a result stream opens only with the credentials
of a stage of an admitted plan, and a step's answer counts only from its own plan — the
hidden states only from the last stage, in the shape that was sent — so a stranger can
neither settle nor fail a step, and a malformed answer fails that step alone. With `tls` (the
master's certificate from its cluster CA, app.py --tls) the endpoint takes only mutual-TLS
clients of that CA, a result stream's certificate must name the stage its credentials claim,
and the RingClient's hop to stage 1 presents the same certificate."""

from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter, deque
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from proto import stage_pb2, stage_pb2_grpc

from .data_auth import AUTH_HEADER, NODE_HEADER, PlanAuth, RefusalLog, header
from .stage_stream import GRPC_OPTIONS, StageError, StreamSender
from .tensor_wire import WireError, from_proto
from .tls import NodeTLS, peer_node

log = logging.getLogger(__name__)

MAX_PENDING = 1024  # steps awaiting a result; the engine has one in flight, so more is a leak
MAX_PLANS = 16  # plans whose stages may open result streams (the current one, and a few being replaced)
_RESULT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(slots=True)
class _Waiting:
    """A step sent round the ring: who may answer it, and the hidden states it must come back as."""

    future: futures.Future
    plan: PlanAuth
    rows: int
    width: int


class ResultServer(stage_pb2_grpc.MasterServicer):
    """Invariant: `_waiting` maps each step id handed out by `expect()` and not yet settled
    to its entry; a future is settled exactly once (result, error or discard), so a late
    or duplicate report is acknowledged with an error and otherwise ignored. Step ids are
    random 64-bit numbers, and a report counts only on a stream whose credentials belong to
    the step's plan: a result only from the plan's last stage, and only as [rows, width]
    float hidden states; an error from any of its stages. Thread-safe."""

    def __init__(self, tls: NodeTLS | None = None):
        self.tls = tls  # the master's TLS identity: this endpoint's and the ring clients'
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}
        self._plans: deque[PlanAuth] = deque(maxlen=MAX_PLANS)  # whose stages may open a stream
        self._server: grpc.Server | None = None
        self.port = 0
        self.results = 0  # final hidden states received (tests prove the ring with it)
        self.errors = 0  # failures stages reported, and malformed results
        self.refused = 0  # streams and reports refused: bad credentials, unknown steps, wrong sender
        self._open: Counter[str] = Counter()  # node id -> its result streams now open
        self._warn = RefusalLog(log)

    def start(self, host: str, port: int) -> int:
        """Bind host:port (0 = any free) and serve; returns the bound port. OSError if taken."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="ring-results"), options=GRPC_OPTIONS
        )
        stage_pb2_grpc.add_MasterServicer_to_server(self, server)
        address = f"{'[' + host + ']' if ':' in host else host}:{port}"
        if self.tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, self.tls.server_credentials())
        if bound == 0:
            raise OSError(f"cannot bind the result port {host}:{port} (pick another with --grpc-port)")
        server.start()
        self._server, self.port = server, bound
        log.info("ring results endpoint on %s:%d%s", host, bound, " (mutual TLS)" if self.tls else "")
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5)
        self.fail_all("the master is shutting down")

    def admit(self, plan: PlanAuth) -> None:
        """Let `plan`'s stages open result streams (the oldest admitted plan drops out past MAX_PLANS)."""
        with self._lock:
            if plan not in self._plans:
                self._plans.append(plan)

    def retire(self, plan: PlanAuth, message: str = "the pipeline was closed") -> int:
        """Refuse `plan`'s stages from now on, and fail its steps still waiting."""
        with self._lock:
            if plan in self._plans:
                self._plans.remove(plan)
        return self._fail_where(lambda w: w.plan is plan, message)

    def expect(self, plan: PlanAuth, rows: int, width: int) -> tuple[int, futures.Future]:
        """A fresh step id, and the future its [rows, width] result (a CPU tensor) settles."""
        fut: futures.Future = futures.Future()
        with self._lock:
            if len(self._waiting) >= MAX_PENDING:
                raise StageError(f"{MAX_PENDING} pipeline steps are already awaiting results")
            step_id = 0
            while step_id == 0 or step_id in self._waiting:  # unguessable, unlike a counter
                step_id = secrets.randbits(64)
            self._waiting[step_id] = _Waiting(fut, plan, rows, width)
        return step_id, fut

    def _take(self, step_id: int) -> _Waiting | None:
        with self._lock:
            return self._waiting.pop(step_id, None)

    def discard(self, step_id: int) -> None:
        self._take(step_id)

    def fail(self, step_id: int, message: str) -> bool:
        w = self._take(step_id)
        if w is not None:
            w.future.set_exception(StageError(message))
        return w is not None

    def _fail_where(self, pred, message: str) -> int:
        with self._lock:
            gone = [sid for sid, w in self._waiting.items() if pred(w)]
            failed = [self._waiting.pop(sid) for sid in gone]
        for w in failed:
            w.future.set_exception(StageError(message))
        return len(failed)

    def fail_all(self, message: str) -> int:
        return self._fail_where(lambda w: True, message)

    def Results(self, request_iterator, context):
        peer = context.peer()
        md = context.invocation_metadata()
        node, token = header(md, NODE_HEADER), header(md, AUTH_HEADER)
        with self._lock:
            plans = [p for p in self._plans if p.sender(node, token)]
        if self.tls is not None and peer_node(context) != node:  # a member's certificate, but not this stage's
            plans = []
        if not plans:  # before reading any message: a stranger learns nothing and settles nothing
            self.refused += 1
            self._warn("refused a result stream from %s: not a stage of a current plan", peer)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a stage of a current plan")
        with self._lock:
            self._open[node] += 1
        try:
            for resp in request_iterator:
                yield self._settle(resp, node, token, peer)
        except grpc.RpcError:
            pass  # the stream was cancelled: handled below
        finally:
            with self._lock:
                self._open[node] -= 1
                others = self._open[node]  # a stage that re-opened its stream still answers on the new one
        if not context.is_active() and not others:
            # A stage's stream broke (killed mid-step): the steps it held will never arrive,
            # and its upstream may already have had its ack, so nobody else reports them.
            failed = self._fail_where(
                lambda w: w.plan.sender(node, token) is not None, f"stage {node} ({peer}) dropped its result stream"
            )
            log.log(
                logging.WARNING if failed else logging.INFO,
                "result stream from %s (%s) broke (%d step(s) failed)",
                node,
                peer,
                failed,
            )

    def _settle(self, resp: stage_pb2.StepResponse, node: str, token: str, peer: str) -> stage_pb2.ResultAck:
        with self._lock:
            w = self._waiting.get(resp.step_id)
            # One answer for "no such step" and "not your plan's step": no oracle for step ids.
            refusal = None if w is not None and w.plan.sender(node, token) else "no such step awaits a result"
            if refusal is None and w is not None and not resp.error and node != w.plan.last:
                refusal = "only the last stage of the plan sends results"
            if refusal is None:
                self._waiting.pop(resp.step_id)
        if refusal is not None or w is None:
            self.refused += 1
            log.debug("refused a report for step %d from %s (%s): %s", resp.step_id, node, peer, refusal)
            return stage_pb2.ResultAck(step_id=resp.step_id, error=refusal or "")
        if resp.error:
            self.errors += 1
            w.future.set_exception(StageError(resp.error))
            return stage_pb2.ResultAck(step_id=resp.step_id)
        try:
            hidden = self._hidden(resp, w)
        except WireError as e:  # fails this step alone: the stream and the model loop go on
            self.errors += 1
            log.warning("malformed result for a step from %s: %s", node, e)
            w.future.set_exception(StageError(f"the last stage {node} sent a malformed result: {e}"))
            return stage_pb2.ResultAck(step_id=resp.step_id, error=f"malformed result: {e}")
        self.results += 1
        w.future.set_result(hidden)
        return stage_pb2.ResultAck(step_id=resp.step_id)

    @staticmethod
    def _hidden(resp: stage_pb2.StepResponse, w: _Waiting) -> torch.Tensor:
        """The result's hidden states, if they are what was sent: [rows, width] floats."""
        if not resp.HasField("hidden"):
            raise WireError("no hidden states")
        shape, dtype = list(resp.hidden.shape), resp.hidden.dtype
        if shape != [w.rows, w.width] or dtype not in _RESULT_DTYPES:
            raise WireError(f"hidden states {shape} {dtype[:16]!r}, expected [{w.rows}, {w.width}] float")
        return from_proto(resp.hidden, w.rows * w.width * 4)


class RingClient:
    """The master's hop to stage 1, for one plan.
    Invariant: every step sent has an entry in `results` until it is settled or times out;
    `plan` is admitted at `results` from construction until `close()`."""

    def __init__(self, first: str, results: ResultServer, reply_to: str, plan: PlanAuth, timeout: float = 10.0):
        self.address = first
        self.results = results
        self.reply_to = reply_to
        self.plan = plan
        self.timeout = timeout
        results.admit(plan)
        self._sender = StreamSender(first, self._on_error, metadata=plan.steps_metadata(), tls=results.tls)

    def _on_error(self, step_id: int, reply_to: str, message: str, broken: bool) -> None:
        self.results.fail(step_id, f"stage {message}")

    def step(self, req: stage_pb2.StepRequest) -> torch.Tensor:
        """Send a step round the ring and wait for its final hidden states, a CPU tensor of the
        sent shape (StageError on a failure anywhere in the ring, a malformed result, or after
        `timeout` seconds without an answer)."""
        shape = list(req.hidden.shape)
        if len(shape) != 2:
            raise StageError(f"a step's hidden states are [T, H], not {shape}")
        step_id, fut = self.results.expect(self.plan, shape[0], shape[1])
        req.step_id = step_id
        req.reply_to = self.reply_to
        self._sender.send(req)
        try:
            return fut.result(timeout=self.timeout)
        except futures.TimeoutError:
            self.results.discard(step_id)
            self._sender.reset()  # a hung stage: the next step opens a fresh stream
            raise StageError(
                f"no result for step {step_id} within {self.timeout:.0f} s (ring from {self.address})"
            ) from None

    def close(self) -> None:
        self._sender.close()
        self.results.retire(self.plan)
