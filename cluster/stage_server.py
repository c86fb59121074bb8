"""gRPC servicer of a pipeline stage: runs its decoder layers on each step it receives.

A stage holds no per-sequence state: every step carries the positions, cache slots and
block tables the master's KV manager decided, so freeing a sequence on the master frees
it on every stage. Steps arrive on one persistent bidirectional stream per hop.

Every step goes round the ring: its `reply_to` names the master's Results endpoint. A
stage forwards its output to `next_hop` without waiting for it and answers upstream with
a bare ack; the last stage sends its output to `reply_to`, and a stage that fails a step
(or whose next hop dies holding it) reports that there too.

Only the plan's members speak to a stage: a Steps stream must carry the plan's steps token
(cluster.data_auth), checked before any message is read, and every step is checked against
the plan's limits (hidden width, context, KV pool, batch budget) before anything is
allocated for it; a refused step is an error for that step alone. When the master serves
gRPC with TLS, `tls` is this worker's certificate (cluster.tls): the server then admits only
clients with a certificate of the cluster's CA, and the hops it opens present this one.

    RINGLLM_SECRET=... python -m cluster.stage_server --model smollm2 --layers 0 15 --port 50051 [--tp N]
runs one stage by hand (the worker process does the same when the master assigns it), for
a driver with its own result endpoint (cluster.ring) and the same secret; with --tp the
stage's layers are split over N ranks on this machine (inference.tp_runner)."""

from __future__ import annotations

import functools
import logging
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from inference.config import EngineConfig
from inference.loader import DTYPES, LoadedModel
from inference.model_runner import ModelRunner
from inference.runner import Runner, StepInputs
from proto import stage_pb2, stage_pb2_grpc

from .control_messages import check_host_port
from .data_auth import AUTH_HEADER, RefusalLog, StageKeys, header
from .stage_stream import GRPC_OPTIONS, MAX_STEP_BYTES, StreamSender
from .step_limits import StepLimits
from .tensor_wire import WireError, decode_step, to_proto
from .tls import NodeTLS

log = logging.getLogger(__name__)

MAX_REPLY_ADDRESSES = 4  # masters a stage keeps result streams open to (normally one)
DEFAULTS = EngineConfig()  # a hand-run stage's batch budget defaults to the master's


@dataclass(slots=True)
class Stage:
    """The layers a worker currently serves, with the KV pool the master sized for them, the
    plan's data-plane keys and the limits every step is checked against."""

    loaded: LoadedModel
    runner: Runner  # a ModelRunner, or a TPRunner over a tensor-parallel group
    num_blocks: int
    block_size: int
    dtype: str
    next_hop: StreamSender | None  # None on the last stage, which answers the master
    keys: StageKeys
    limits: StepLimits


class StageServicer(stage_pb2_grpc.StageServicer):
    """Invariant: steps of one stream run in arrival order, one at a time per stage (the
    model and its KV cache are not thread-safe), and every request of an admitted stream
    gets one answer. A worker's servicer starts empty and gets its layers (and its plan's
    keys) with `install` when assigned; until then every Steps stream is refused."""

    def __init__(self, node_id: str, device: str = "cpu"):
        self.node_id = node_id
        self.device = device
        self.stage: Stage | None = None
        self._lock = threading.Lock()
        self.steps_done = 0
        self.in_flight = 0
        self.refused = 0  # Steps streams refused for bad credentials (tests read it)
        self.tls: NodeTLS | None = None  # this node's certificate for the hops it opens; None: plaintext
        self._warn = RefusalLog(log)
        self._replies: dict[tuple[str, StageKeys], StreamSender] = {}  # (reply_to, keys) -> result stream
        self._replies_lock = threading.Lock()  # not _lock: a reader thread must not wait out a step
        # Every step runs on this one thread, whichever gRPC thread serves the stream: torch's
        # OpenMP slows down once several threads keep pools (inference/compute_thread.py).
        self._compute = futures.ThreadPoolExecutor(1, thread_name_prefix="stage-compute")

    def install(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        dtype: str,
        next_hop: str | None,
        runner: Runner | None = None,
        *,
        keys: StageKeys,
        limits: StepLimits | None = None,
    ) -> None:
        """`runner`: a ready TPRunner for a tensor-parallel stage (its pool already sized);
        None builds a local ModelRunner. `limits`: the plan's step budget (None: the model's
        and the pool's limits with the default batch sizes)."""
        if runner is None:
            runner = ModelRunner(
                loaded.model,
                loaded.config,
                loaded.layers,
                num_blocks,
                block_size,
                DTYPES[dtype],
                self.device,
                loaded.quant,
            )
        if limits is None:
            limits = stage_limits(loaded, num_blocks, block_size)
        stage = Stage(
            loaded,
            runner,
            num_blocks,
            block_size,
            dtype,
            StreamSender(
                next_hop, functools.partial(self._next_failed, keys), metadata=keys.steps_metadata(), tls=self.tls
            )
            if next_hop
            else None,
            keys,
            limits,
        )
        with self._lock:
            old, self.stage = self.stage, stage
        self._release(old, keep=runner)
        self._close_replies(keep=keys)

    def drop(self) -> None:
        with self._lock:
            old, self.stage = self.stage, None
        self._release(old)
        self._close_replies(keep=None)

    @staticmethod
    def _release(old: Stage | None, keep: Runner | None = None) -> None:
        if old is None:
            return
        if old.next_hop is not None:
            old.next_hop.close()
        if old.runner is not keep:
            old.runner.close()  # a TP group stops its ranks

    def _close_replies(self, keep: StageKeys | None) -> None:
        """Close the result streams opened with another plan's keys (they would be refused)."""
        with self._replies_lock:
            stale = [k for k in self._replies if k[1] != keep]
            senders = [self._replies.pop(k) for k in stale]
        for sender in senders:
            sender.close()

    def _reply_stream(self, keys: StageKeys, address: str) -> StreamSender:
        with self._replies_lock:
            sender = self._replies.get((address, keys))
            if sender is None:
                if len(self._replies) >= MAX_REPLY_ADDRESSES:  # drop the oldest master
                    self._replies.pop(next(iter(self._replies))).close()
                sender = self._replies[(address, keys)] = StreamSender(
                    address,
                    self._reply_failed,
                    kind="results",
                    metadata=keys.results_metadata(self.node_id),
                    tls=self.tls,
                )
            return sender

    @staticmethod
    def _reply_failed(step_id: int, reply_to: str, message: str, broken: bool) -> None:
        # Nobody to tell: the master is gone (it fails its own steps by timeout), or it no
        # longer waits for this step (an error it already heard about from an ack: routine).
        log.log(logging.WARNING if broken else logging.DEBUG, "master result endpoint: step %d: %s", step_id, message)

    def _next_failed(self, keys: StageKeys, step_id: int, reply_to: str, message: str, broken: bool) -> None:
        # An error ack means the next stage already reported to the master itself; a broken
        # stream means it may be dead, so this stage reports for it.
        if broken:
            self._reply_stream(keys, reply_to).send(
                stage_pb2.StepResponse(step_id=step_id, error=f"{self.node_id}: next stage {message}")
            )

    def _fail(self, stage: Stage, req: stage_pb2.StepRequest, error: str) -> stage_pb2.StepResponse:
        self._reply_stream(stage.keys, req.reply_to).send(
            stage_pb2.StepResponse(step_id=req.step_id, error=f"{self.node_id}: {error}")
        )
        return stage_pb2.StepResponse(step_id=req.step_id, error=error)

    def run_step(self, req: stage_pb2.StepRequest, stage: Stage) -> stage_pb2.StepResponse:
        """Run one step of an admitted stream on `stage` (the one its credentials are for)."""
        if req.ping:  # per-hop overhead probe: answer at once, run nothing
            return stage_pb2.StepResponse(step_id=req.step_id)
        try:
            check_host_port(req.reply_to)
        except ValueError as e:  # every step names the master's result endpoint
            log.warning("rejected step %d: reply_to %.40r %s", req.step_id, req.reply_to, e)
            return stage_pb2.StepResponse(step_id=req.step_id, error=f"malformed step: reply_to {e}")
        try:
            step = decode_step(req, MAX_STEP_BYTES, self.device, limits=stage.limits)
        except WireError as e:
            log.warning("rejected step %d: %s", req.step_id, e)
            return self._fail(stage, req, f"malformed step: {e}")
        inputs = StepInputs(
            order=[],
            token_ids=step.positions,
            positions=step.positions,
            meta=step.attention_metadata(),
            sample_rows=[],
            sample_batch_idx=[],
        )
        with self._lock:
            self.in_flight += 1
            try:
                hidden = stage.runner.forward(inputs, step.hidden.to(DTYPES[stage.dtype]))
            finally:
                self.in_flight -= 1
            self.steps_done += 1
        # Hand the output on and acknowledge: the answer never comes back through here.
        if stage.next_hop is None:
            self._reply_stream(stage.keys, req.reply_to).send(
                stage_pb2.StepResponse(step_id=req.step_id, hidden=to_proto(hidden.cpu()))
            )
        else:
            req.hidden.CopyFrom(to_proto(hidden.cpu()))  # the request is ours now: reuse it for the next hop
            stage.next_hop.send(req)
        return stage_pb2.StepResponse(step_id=req.step_id)

    def _admitted(self, token: str) -> Stage | None:
        stage = self.stage
        return stage if stage is not None and stage.keys.admits_steps(token) else None

    def Steps(self, request_iterator, context):
        token = header(context.invocation_metadata(), AUTH_HEADER)
        if self._admitted(token) is None:  # before reading any message
            self.refused += 1
            why = "no valid credentials for this stage's plan" if self.stage else "this stage serves no plan"
            self._warn("refused a Steps stream from %s: %s", context.peer(), why)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        for req in request_iterator:
            stage = self._admitted(token)  # a re-plan brings new keys: old streams end here
            if stage is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "the plan changed; this stream's credentials expired")
                return  # abort raises; this is for the type checker
            yield self._compute.submit(self.run_step, req, stage).result()

    def Health(self, request, context):
        stage = self.stage
        rng = stage.loaded.layers if stage else None
        return stage_pb2.HealthReply(
            node_id=self.node_id,
            start_layer=rng.start if rng else 0,
            end_layer=rng.end if rng else 0,
            ready=stage is not None,
            load=self.in_flight,
            protocol_version=stage_pb2.PROTOCOL_VERSION_CURRENT,
        )


def stage_limits(
    loaded: LoadedModel,
    num_blocks: int,
    block_size: int,
    max_seqs: int | None = None,
    max_tokens: int | None = None,
    max_context_tokens: int | None = None,
) -> StepLimits:
    """What a stage of `loaded` with this KV pool accepts per step (batch sizes default to the master's)."""
    return StepLimits.for_pool(
        loaded.config.hidden_size,
        loaded.config.max_position,
        num_blocks,
        block_size,
        max_seqs or DEFAULTS.max_batch,
        max_tokens or DEFAULTS.max_batch_tokens,
        max_context_tokens,
    )


def serve(
    servicer: StageServicer, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, int]:
    """Start a stage's gRPC server on host:port (0 = any free): plaintext, or with `credentials`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    from .stage_cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
