"""gRPC servicer of a pipeline stage: runs its decoder layers on each step it receives.

A stage holds no per-sequence state: every step carries the positions, cache slots and
block tables the master's KV manager decided, so freeing a sequence on the master frees
it on every stage. Steps arrive on one persistent bidirectional stream per hop.

Every step goes round the ring: its `reply_to` names the master's Results endpoint. A
stage forwards its output to `next_hop` without waiting for it and answers upstream with
a bare ack; the last stage sends its output to `reply_to`, and a stage that fails a step
(or whose next hop dies holding it) reports that there too.

    python -m cluster.stage_server --model smollm2 --layers 0 15 --num-blocks 512 --port 50051 [--tp N]
runs one stage by hand (the worker process does the same when the master assigns it), for
a driver with its own result endpoint (cluster.ring); with --tp the stage's layers are
split over N ranks on this machine (inference.tp_runner)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

from inference import cli
from inference.config import LayerRange
from inference.loader import DTYPES, LoadedModel, load_model
from inference.model_runner import ModelRunner
from inference.runner import Runner, StepInputs
from proto import stage_pb2, stage_pb2_grpc

from .control_messages import check_host_port
from .stage_stream import GRPC_OPTIONS, MAX_STEP_BYTES, StreamSender
from .tensor_wire import WireError, decode_step, to_proto

log = logging.getLogger(__name__)

MAX_REPLY_ADDRESSES = 4  # masters a stage keeps result streams open to (normally one)


@dataclass(slots=True)
class Stage:
    """The layers a worker currently serves, with the KV pool the master sized for them."""

    loaded: LoadedModel
    runner: Runner  # a ModelRunner, or a TPRunner over a tensor-parallel group
    num_blocks: int
    block_size: int
    dtype: str
    next_hop: StreamSender | None  # None on the last stage, which answers the master


class StageServicer(stage_pb2_grpc.StageServicer):
    """Invariant: steps of one stream run in arrival order, one at a time per stage (the
    model and its KV cache are not thread-safe), and every request gets one answer. A
    worker's servicer starts empty and gets its layers with `install` when assigned."""

    def __init__(self, node_id: str, device: str = "cpu"):
        self.node_id = node_id
        self.device = device
        self.stage: Stage | None = None
        self._lock = threading.Lock()
        self.steps_done = 0
        self.in_flight = 0
        self._replies: dict[str, StreamSender] = {}  # reply_to address -> result stream
        self._replies_lock = threading.Lock()  # not _lock: a reader thread must not wait out a step

    def install(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        dtype: str,
        next_hop: str | None,
        runner: Runner | None = None,
    ) -> None:
        """`runner`: a ready TPRunner for a tensor-parallel stage (its pool already sized);
        None builds a local ModelRunner."""
        if runner is None:
            runner = ModelRunner(
                loaded.model, loaded.config, loaded.layers, num_blocks, block_size, DTYPES[dtype], self.device
            )
        stage = Stage(
            loaded,
            runner,
            num_blocks,
            block_size,
            dtype,
            StreamSender(next_hop, self._next_failed) if next_hop else None,
        )
        with self._lock:
            old, self.stage = self.stage, stage
        self._release(old, keep=runner)

    def drop(self) -> None:
        with self._lock:
            old, self.stage = self.stage, None
        self._release(old)
        with self._replies_lock:
            replies, self._replies = self._replies, {}
        for sender in replies.values():
            sender.close()

    @staticmethod
    def _release(old: Stage | None, keep: Runner | None = None) -> None:
        if old is None:
            return
        if old.next_hop is not None:
            old.next_hop.close()
        if old.runner is not keep:
            old.runner.close()  # a TP group stops its ranks

    def _reply_stream(self, address: str) -> StreamSender:
        with self._replies_lock:
            sender = self._replies.get(address)
            if sender is None:
                if len(self._replies) >= MAX_REPLY_ADDRESSES:  # drop the oldest master
                    self._replies.pop(next(iter(self._replies))).close()
                sender = self._replies[address] = StreamSender(address, self._reply_failed, kind="results")
            return sender

    @staticmethod
    def _reply_failed(step_id: int, reply_to: str, message: str, broken: bool) -> None:
        # Nobody to tell: the master is gone (it fails its own steps by timeout), or it no
        # longer waits for this step (an error it already heard about from an ack: routine).
        log.log(logging.WARNING if broken else logging.DEBUG, "master result endpoint: step %d: %s", step_id, message)

    def _next_failed(self, step_id: int, reply_to: str, message: str, broken: bool) -> None:
        # An error ack means the next stage already reported to the master itself; a broken
        # stream means it may be dead, so this stage reports for it.
        if broken:
            self._reply_stream(reply_to).send(
                stage_pb2.StepResponse(step_id=step_id, error=f"{self.node_id}: next stage {message}")
            )

    def _fail(self, req: stage_pb2.StepRequest, error: str) -> stage_pb2.StepResponse:
        self._reply_stream(req.reply_to).send(
            stage_pb2.StepResponse(step_id=req.step_id, error=f"{self.node_id}: {error}")
        )
        return stage_pb2.StepResponse(step_id=req.step_id, error=error)

    def run_step(self, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        if req.ping:  # per-hop overhead probe: answer at once, run nothing
            return stage_pb2.StepResponse(step_id=req.step_id)
        try:
            check_host_port(req.reply_to)
        except ValueError as e:  # every step names the master's result endpoint
            log.warning("rejected step %d: reply_to %.40r %s", req.step_id, req.reply_to, e)
            return stage_pb2.StepResponse(step_id=req.step_id, error=f"malformed step: reply_to {e}")
        stage = self.stage
        if stage is None:
            return self._fail(req, "this worker holds no layers")
        try:
            step = decode_step(req, MAX_STEP_BYTES, self.device, stage.num_blocks, stage.loaded.config.max_position)
            if step.block_size != stage.block_size:
                raise WireError(f"block size {step.block_size}, this stage uses {stage.block_size}")
        except WireError as e:
            log.warning("rejected step %d: %s", req.step_id, e)
            return self._fail(req, f"malformed step: {e}")
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
            self._reply_stream(req.reply_to).send(
                stage_pb2.StepResponse(step_id=req.step_id, hidden=to_proto(hidden.cpu()))
            )
        else:
            req.hidden.CopyFrom(to_proto(hidden.cpu()))  # the request is ours now: reuse it for the next hop
            stage.next_hop.send(req)
        return stage_pb2.StepResponse(step_id=req.step_id)

    def Steps(self, request_iterator, context):
        for req in request_iterator:
            yield self.run_step(req)

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


def serve(servicer: StageServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    server.start()
    return server, bound


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cluster.stage_server",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_model_source(p)
    p.add_argument(
        "--layers",
        type=int,
        nargs=2,
        required=True,
        metavar=("START", "END"),
        help="decoder layers [START, END) to run",
    )
    p.add_argument("--num-blocks", type=cli.positive_int, default=512, help="KV blocks (must equal the master's pool)")
    p.add_argument(
        "--block-size", type=cli.positive_int, default=16, help="tokens per KV block (must equal the master's)"
    )
    cli.add_compute(p)
    cli.add_quant(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument(
        "--port", type=cli.port_number, default=0, help="gRPC port (0 = any free; the bound port is printed)"
    )
    p.add_argument("--next-hop", default=None, help="host:port of the next stage (omit on the last stage)")
    p.add_argument("--node-id", default=None, help="name in logs and error reports (default: stage-START-END)")
    cli.add_tp(p)
    cli.add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    from inference.errors import InferenceError
    from inference.loader import read_config
    from inference.model_source import resolve_model

    try:
        n = read_config(resolve_model(args.model)).num_layers
        rng = LayerRange(args.layers[0], args.layers[1], n, embed=False, head=False)
        runner = None
        if args.tp != 1:
            from inference.tp_runner import start_tp

            runner = start_tp(
                args.model,
                args.dtype,
                args.device,
                rng,
                args.num_blocks,
                args.block_size,
                args.tp,
                args.host,
                args.attn,
                args.quant,
            )
            loaded = runner.loaded
        else:
            loaded = load_model(args.model, args.dtype, args.device, layers=rng, attn=args.attn, quant=args.quant)
        servicer = StageServicer(args.node_id or f"stage-{rng.start}-{rng.end}", args.device)
        servicer.install(loaded, args.num_blocks, args.block_size, args.dtype, args.next_hop, runner)
        server, port = serve(servicer, args.host, args.port)
    except (InferenceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"stage [{rng.start}, {rng.end}) listening on {args.host}:{port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop(grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
