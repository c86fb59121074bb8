"""`python -m cluster.worker --master http://HOST:PORT`: a pipeline stage on this machine.

It starts its gRPC stage server, joins the master over the WebSocket control channel
(retrying forever with capped backoff), loads the layer range the master assigns (only
those layers' weights are read), serves steps, and re-registers with what it holds when
the master restarts, so the master can adopt it without a reload. When the master serves
gRPC with TLS (app.py --tls) the worker learns it in the handshake, gets its key certified
and serves mutual TLS from then on (cluster.stage_endpoint); no worker flag is needed."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import sys
import time
from functools import partial

from inference.compute_thread import in_fresh_thread, omp_wait_defaults

omp_wait_defaults()  # before torch loads (libgomp reads the environment once), as app.py does

import psutil
import torch

from inference import cli
from inference.config import LayerRange
from inference.errors import InferenceError
from inference.loader import LoadedModel, load_model
from inference.mlx import resolve_backend
from inference.runner import Runner
from inference.tp_runner import start_tp

from .control_client import ControlClient, control_url
from .control_messages import Assign, Failed, Ready
from .data_auth import unwrap_keys
from .stage_endpoint import StageEndpoint
from .stage_server import StageServicer, stage_limits
from .step_limits import StepLimits

log = logging.getLogger("worker")


def parse_layers(value: str) -> int | tuple[int, int]:
    """`--layers 8` (a count) or `--layers 0-15` (a range [0, 15))."""
    try:
        if "-" in value:
            a, b = value.split("-", 1)
            return int(a), int(b)
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not N or START-END") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cluster.worker",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--master",
        nargs="+",
        required=True,
        metavar="URL",
        help="master URL(s), e.g. http://10.0.0.2:7860; tried in turn, hostnames re-resolved on every retry",
    )
    p.add_argument(
        "--join-token",
        default=os.environ.get("RINGLLM_JOIN_TOKEN"),
        help="shared secret the master requires (env RINGLLM_JOIN_TOKEN); proven by HMAC, never sent",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind and advertise for gRPC")
    p.add_argument("--grpc-port", type=cli.port_number, default=0, help="gRPC port (0 = any free port)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device: cpu, cuda, cuda:1, ... (the model and dtype come from the master)",
    )
    p.add_argument("--node-id", default=None, help="unique id (default: hostname-pid-random)")
    cli.add_tp(p, "the worker's assigned layers; the group binds to --host")
    cli.add_backend(p)
    p.add_argument(
        "--layers", type=parse_layers, default=None, help="override the planner: a layer count N or a range START-END"
    )
    cli.add_log_level(p)
    return p


def measure_capacity(device: str) -> dict:
    """Memory and a quick matmul speed, reported when joining (used by the planner)."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
    else:
        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
    a = torch.randn(512, 512, device=device)
    a @ a  # warm-up
    t = time.perf_counter()
    for _ in range(8):
        a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    gflops = 8 * 2 * 512**3 / (time.perf_counter() - t) / 1e9
    return dict(device=device, total_bytes=int(total), free_bytes=int(free), matmul_gflops=round(gflops, 1))


def measure_mlx_capacity() -> dict:
    """`measure_capacity` for an MLX worker: unified memory on Apple silicon, so the system's."""
    from inference.mlx.device import device_name, matmul_gflops

    vm = psutil.virtual_memory()
    return dict(
        device=device_name(),
        backend="mlx",
        total_bytes=int(vm.total),
        free_bytes=int(vm.available),
        matmul_gflops=matmul_gflops(),
    )


class Worker:
    """Invariant: `holding` describes exactly what `servicer.stage` serves (or is None)."""

    def __init__(self, args: argparse.Namespace, servicer: StageServicer, address: str):
        self.args = args
        self.servicer = servicer
        self.address = address
        self.holding: dict | None = None
        self.loads = 0
        self.capacity = measure_mlx_capacity() if args.backend == "mlx" else measure_capacity(args.device)
        if args.layers is not None:
            self.capacity["layers"] = list(args.layers) if isinstance(args.layers, tuple) else args.layers

    def register_payload(self) -> dict:
        return dict(grpc_address=self.address, capacity=self.capacity, holding=self.holding)

    def status_payload(self) -> dict:
        rss = psutil.Process().memory_info().rss
        return dict(
            state="ready" if self.holding else "idle",
            in_flight=self.servicer.in_flight,
            steps_done=self.servicer.steps_done,
            mem_used_bytes=rss,
            mem_free_bytes=psutil.virtual_memory().available,
        )

    async def on_assign(self, a: Assign) -> Ready | Failed:
        want = a.shard()
        weights = ("model", "start", "end", "num_layers", "dtype", "quant")
        t = time.perf_counter()
        try:
            keys = unwrap_keys(
                a.steps_key, a.result_key, a.key_nonce, a.keys_wrapped, self.servicer.node_id, self.args.join_token
            )
        except ValueError as e:
            log.error("refusing plan %d: %s", a.plan_id, e)
            return Failed(plan_id=a.plan_id, reason=str(e))

        def limits(loaded: LoadedModel) -> StepLimits:  # the plan's budget per step
            return stage_limits(loaded, a.num_blocks, a.block_size, a.max_seqs, a.max_tokens, a.max_context_tokens)

        try:
            stage = self.servicer.stage
            tp = self.args.tp
            mlx = self.args.backend == "mlx"
            same_pool = self.holding and (self.holding["num_blocks"], self.holding["block_size"]) == (
                a.num_blocks,
                a.block_size,
            )
            if (
                stage is not None
                and self.holding
                and all(self.holding[k] == want[k] for k in weights)
                and ((tp == 1 and not mlx) or same_pool)
            ):
                # Same weights as before (e.g. the master restarted): keep them; only the KV
                # pool (a TP group keeps its own, hence same_pool) and the next hop are rebuilt.
                self.servicer.install(
                    stage.loaded,
                    a.num_blocks,
                    a.block_size,
                    a.dtype,
                    a.next_hop,
                    stage.runner if tp > 1 or mlx else None,
                    keys=keys,
                    limits=limits(stage.loaded),
                )
            else:
                self.servicer.drop()
                rng = LayerRange(a.start, a.end, a.num_layers, embed=False, head=False)
                runner: Runner | None = None
                if tp > 1:  # ranks 1..N-1 start now and load their shards of the same range
                    group = await in_fresh_thread(
                        partial(
                            start_tp,
                            a.model,
                            a.dtype,
                            self.args.device,
                            rng,
                            a.num_blocks,
                            a.block_size,
                            tp,
                            self.args.host,
                            quant=a.quant,
                        )
                    )
                    loaded, runner = group.loaded, group
                elif mlx:  # the plan's dtype is the wire's: hidden states arrive and leave in it
                    from inference.mlx.runner import MLXRunner

                    on_mlx = await in_fresh_thread(
                        MLXRunner.load, a.model, a.dtype, rng, a.num_blocks, a.block_size, a.quant, self.args.adapter
                    )
                    loaded, runner = on_mlx.loaded, on_mlx
                else:
                    load = partial(load_model, a.model, a.dtype, self.args.device, rng, quant=a.quant)
                    loaded = await in_fresh_thread(load)
                self.servicer.install(
                    loaded, a.num_blocks, a.block_size, a.dtype, a.next_hop, runner, keys=keys, limits=limits(loaded)
                )
                self.loads += 1
        except (InferenceError, OSError, RuntimeError, ValueError) as e:
            log.error("cannot load layers [%d, %d) of %s: %s", a.start, a.end, a.model, e)
            self.holding = None
            return Failed(plan_id=a.plan_id, reason=str(e))
        self.holding = dict(want, loads=self.loads)
        log.info(
            "serving layers [%d, %d) of %s (loads: %d, next hop: %s)",
            a.start,
            a.end,
            a.model,
            self.loads,
            a.next_hop or "master",
        )
        s = self.status_payload()
        return Ready(
            plan_id=a.plan_id,
            load_seconds=time.perf_counter() - t,
            mem_used_bytes=s["mem_used_bytes"],
            mem_free_bytes=s["mem_free_bytes"],
            loads=self.loads,
        )

    async def on_drain(self, reason: str) -> None:
        log.info("drained: %s", reason)
        self.servicer.drop()
        self.holding = None


async def run(args: argparse.Namespace) -> int:
    node_id = args.node_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    servicer = StageServicer(node_id, args.device)
    try:
        endpoint = StageEndpoint(servicer, args.host, args.grpc_port)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    address = endpoint.address
    worker = Worker(args, servicer, address)
    log.info("worker %s: gRPC on %s, joining %s", node_id, address, ", ".join(args.master))
    client = ControlClient(
        args.master,
        node_id,
        args.join_token,
        worker.register_payload,
        worker.on_assign,
        worker.on_drain,
        worker.status_payload,
        csr=endpoint.csr,
        on_registered=endpoint.on_registered,
    )
    try:
        await client.run()
    finally:
        endpoint.stop(grace=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for url in args.master:  # checked before anything starts: a bad URL is one line, not a traceback
        try:
            control_url(url)
        except ValueError as e:
            print(f"error: --master: {e}", file=sys.stderr)
            return 2
    try:
        args.backend = resolve_backend(args.backend)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backend == "mlx" and args.tp > 1:
        print("error: --backend mlx runs its layers in one process: drop --tp", file=sys.stderr)
        return 2
    if args.adapter and args.backend != "mlx":
        print("error: --adapter is served by the MLX backend: add --backend mlx", file=sys.stderr)
        return 2
    cli.setup_logging(args.log_level)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
