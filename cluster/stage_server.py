"""gRPC servicer of a pipeline stage: runs its decoder layers on each step it receives.

A stage holds no per-sequence state: every step carries the positions, cache slots and
block tables the master's KV manager decided, so freeing a sequence on the master frees
it on every stage. Steps arrive on one persistent bidirectional stream per hop; a stage
with a `next_hop` forwards its output there and relays the answer back upstream.

    python -m cluster.stage_server --model smollm2 --layers 0 15 --num-blocks 512 --port 50051
runs one stage by hand (the worker process does the same when the master assigns it)."""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from inference.config import LayerRange
from inference.loader import DTYPES, LoadedModel, load_model
from inference.model_runner import ModelRunner, StepInputs
from proto import stage_pb2, stage_pb2_grpc

from .stage_client import GRPC_OPTIONS, MAX_STEP_BYTES, StageClient, StageError
from .tensor_wire import WireError, decode_step, to_proto

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Stage:
    """The layers a worker currently serves, with the KV pool the master sized for them."""

    loaded: LoadedModel
    runner: ModelRunner
    num_blocks: int
    block_size: int
    dtype: str
    next: StageClient | None


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

    def install(self, loaded: LoadedModel, num_blocks: int, block_size: int, dtype: str,
                next_hop: str | None) -> None:
        runner = ModelRunner(loaded.model, loaded.config, loaded.layers, num_blocks, block_size,
                             DTYPES[dtype], self.device)
        stage = Stage(loaded, runner, num_blocks, block_size, dtype, StageClient(next_hop) if next_hop else None)
        with self._lock:
            old, self.stage = self.stage, stage
        if old is not None and old.next is not None:
            old.next.close()

    def drop(self) -> None:
        with self._lock:
            old, self.stage = self.stage, None
        if old is not None and old.next is not None:
            old.next.close()

    def run_step(self, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        if req.ping:  # per-hop overhead probe: answer at once, run nothing
            return stage_pb2.StepResponse(step_id=req.step_id)
        stage = self.stage
        if stage is None:
            return stage_pb2.StepResponse(step_id=req.step_id, error="this worker holds no layers")
        try:
            step = decode_step(req, MAX_STEP_BYTES, self.device, stage.num_blocks,
                               stage.loaded.config.max_position)
            if step.block_size != stage.block_size:
                raise WireError(f"block size {step.block_size}, this stage uses {stage.block_size}")
        except WireError as e:
            log.warning("rejected step %d: %s", req.step_id, e)
            return stage_pb2.StepResponse(step_id=req.step_id, error=f"malformed step: {e}")
        inputs = StepInputs(order=[], token_ids=step.positions, positions=step.positions,
                            meta=step.attention_metadata(), sample_rows=[], sample_batch_idx=[])
        with self._lock:
            self.in_flight += 1
            try:
                hidden = stage.runner.forward(inputs, step.hidden.to(DTYPES[stage.dtype]))
            finally:
                self.in_flight -= 1
            self.steps_done += 1
        out = stage_pb2.StepResponse(step_id=req.step_id, hidden=to_proto(hidden.cpu()))
        if stage.next is None:
            return out
        fwd = stage_pb2.StepRequest()
        fwd.CopyFrom(req)
        fwd.hidden.CopyFrom(out.hidden)
        try:
            return stage.next.step(fwd)
        except StageError as e:
            return stage_pb2.StepResponse(step_id=req.step_id, error=f"next stage: {e}")

    def Steps(self, request_iterator, context):
        for req in request_iterator:
            yield self.run_step(req)

    def Health(self, request, context):
        stage = self.stage
        rng = stage.loaded.layers if stage else None
        return stage_pb2.HealthReply(
            node_id=self.node_id, start_layer=rng.start if rng else 0, end_layer=rng.end if rng else 0,
            ready=stage is not None, load=self.in_flight, protocol_version=stage_pb2.PROTOCOL_VERSION_CURRENT)


def serve(servicer: StageServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.stage_server", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="model source (as for app.py --model)")
    p.add_argument("--layers", type=int, nargs=2, required=True, metavar=("START", "END"),
                   help="decoder layers [START, END) to run")
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks (must equal the master's pool)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (must equal the master's)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free; the bound port is printed)")
    p.add_argument("--next-hop", default=None, help="host:port of the next stage (omit on the last stage)")
    p.add_argument("--node-id", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from inference.errors import InferenceError
    from inference.loader import read_config
    from inference.model_source import resolve_model

    try:
        n = read_config(resolve_model(args.model)).num_layers
        rng = LayerRange(args.layers[0], args.layers[1], n, embed=False, head=False)
        loaded = load_model(args.model, args.dtype, args.device, layers=rng)
        servicer = StageServicer(args.node_id or f"stage-{rng.start}-{rng.end}", args.device)
        servicer.install(loaded, args.num_blocks, args.block_size, args.dtype, args.next_hop)
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
