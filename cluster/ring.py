"""The master's end of the ring: master → stage 1 → … → stage N → master.

`ResultServer` is a small gRPC server on the master (`Master.Results`): the last stage
sends each step's final hidden states there, and any stage that fails a step reports it
there, so an answer costs N+1 hops instead of 2N. `RingClient` is what the PipelineRunner
talks to: `step()` sends a step to stage 1 without waiting for stage 1's answer and waits
on the step's future instead, with a timeout."""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent import futures

import grpc

from proto import stage_pb2, stage_pb2_grpc

from .stage_stream import GRPC_OPTIONS, StageError, StreamSender

log = logging.getLogger(__name__)

MAX_PENDING = 1024  # steps awaiting a result; the engine has one in flight, so more is a leak


class ResultServer(stage_pb2_grpc.MasterServicer):
    """Invariant: `_waiting` maps each step id handed out by `expect()` and not yet settled
    to its future; a future is settled exactly once (result, error or discard), so a late
    or duplicate report is acknowledged with an error and otherwise ignored. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[int, futures.Future] = {}
        self._ids = itertools.count(1)  # unique across pipelines: re-plans share this server
        self._server: grpc.Server | None = None
        self.port = 0
        self.results = 0  # final hidden states received (tests prove the ring with it)
        self.errors = 0  # failures stages reported

    def start(self, host: str, port: int) -> int:
        """Bind host:port (0 = any free) and serve; returns the bound port. OSError if taken."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="ring-results"), options=GRPC_OPTIONS
        )
        stage_pb2_grpc.add_MasterServicer_to_server(self, server)
        bound = server.add_insecure_port(f"{'[' + host + ']' if ':' in host else host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the result port {host}:{port} (pick another with --grpc-port)")
        server.start()
        self._server, self.port = server, bound
        log.info("ring results endpoint on %s:%d", host, bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5)
        self.fail_all("the master is shutting down")

    def expect(self) -> tuple[int, futures.Future]:
        fut: futures.Future = futures.Future()
        with self._lock:
            if len(self._waiting) >= MAX_PENDING:
                raise StageError(f"{MAX_PENDING} pipeline steps are already awaiting results")
            step_id = next(self._ids)
            self._waiting[step_id] = fut
        return step_id, fut

    def _take(self, step_id: int) -> futures.Future | None:
        with self._lock:
            return self._waiting.pop(step_id, None)

    def discard(self, step_id: int) -> None:
        self._take(step_id)

    def fail(self, step_id: int, message: str) -> bool:
        fut = self._take(step_id)
        if fut is not None:
            fut.set_exception(StageError(message))
        return fut is not None

    def fail_all(self, message: str) -> int:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            fut.set_exception(StageError(message))
        return len(waiting)

    def Results(self, request_iterator, context):
        peer = context.peer()
        try:
            for resp in request_iterator:
                yield self._settle(resp, peer)
        except grpc.RpcError:
            pass  # the stream was cancelled: handled below
        if not context.is_active():
            # The last stage's stream broke (killed mid-step): the steps it held will never
            # arrive, and its upstream may already have had its ack, so nobody else reports them.
            failed = self.fail_all(f"the last stage ({peer}) dropped its result stream")
            log.log(
                logging.WARNING if failed else logging.INFO,
                "result stream from %s broke (%d step(s) failed)",
                peer,
                failed,
            )

    def _settle(self, resp: stage_pb2.StepResponse, peer: str) -> stage_pb2.ResultAck:
        fut = self._take(resp.step_id)
        if fut is None:  # timed out already, or a stale stage from an earlier plan
            log.debug("result for unknown step %d from %s", resp.step_id, peer)
            return stage_pb2.ResultAck(step_id=resp.step_id, error="no such step awaits a result")
        if resp.error:
            self.errors += 1
            fut.set_exception(StageError(resp.error))
        elif not resp.HasField("hidden"):
            fut.set_exception(StageError(f"step {resp.step_id}: result without hidden states"))
        else:
            self.results += 1
            fut.set_result(resp)
        return stage_pb2.ResultAck(step_id=resp.step_id)


class RingClient:
    """The master's hop to stage 1.
    Invariant: every step sent has a future in `results` until it is settled or times out."""

    def __init__(self, first: str, results: ResultServer, reply_to: str, timeout: float = 10.0):
        self.address = first
        self.results = results
        self.reply_to = reply_to
        self.timeout = timeout
        self._sender = StreamSender(first, self._on_error)

    def _on_error(self, step_id: int, reply_to: str, message: str, broken: bool) -> None:
        self.results.fail(step_id, f"stage {message}")

    def step(self, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        """Send a step round the ring and wait for its final hidden states (StageError on a
        failure anywhere in the ring, or after `timeout` seconds without an answer)."""
        step_id, fut = self.results.expect()
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
