"""`python -m cluster.stage_server`: run one pipeline stage by hand (see cluster.stage_server).

The flags, the data-plane secret (`--secret-file` or $RINGLLM_SECRET, shared by every stage
and the driver) and the start-up; the servicer itself lives in cluster.stage_server."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from inference import cli
from inference.config import LayerRange
from inference.loader import load_model
from inference.mlx import resolve_backend
from inference.runner import Runner

from .data_auth import MIN_SECRET_BYTES, StageKeys
from .stage_server import DEFAULTS, StageServicer, serve, stage_limits


def read_secret(path: str | None) -> bytes:
    """A hand-run stage's data-plane secret: the file's contents, else $RINGLLM_SECRET.
    ValueError (with what to do) when neither gives one long enough."""
    if path:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --secret-file {path}: {e}") from None
    else:
        text = os.environ.get("RINGLLM_SECRET", "")
    secret = text.strip().encode()
    if len(secret) < MIN_SECRET_BYTES:
        where = f"--secret-file {path}" if path else "RINGLLM_SECRET"
        raise ValueError(
            f"a stage needs a data-plane secret of at least {MIN_SECRET_BYTES} characters "
            f"({where} gives {len(secret)}); set RINGLLM_SECRET or --secret-file, "
            "the same for every stage and the driver"
        )
    return secret


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cluster.stage_server",
        description="gRPC servicer of a pipeline stage: runs its decoder layers on each step it receives.",
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
    p.add_argument(
        "--node-id", default=None, help="name in logs, error reports and result credentials (default: stage-START-END)"
    )
    p.add_argument(
        "--secret-file",
        default=None,
        help="file holding the data-plane secret the other stages and the driver share (default: $RINGLLM_SECRET)",
    )
    # The same names and defaults as the master's batch flags: a step over them is refused.
    p.add_argument("--max-batch", type=cli.positive_int, default=DEFAULTS.max_batch, help="most sequences in one step")
    p.add_argument(
        "--max-batch-tokens",
        type=cli.positive_int,
        default=DEFAULTS.max_batch_tokens,
        help="most new tokens in one step",
    )
    cli.add_tp(p)
    cli.add_backend(p)
    cli.add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    from inference.errors import InferenceError
    from inference.loader import read_config
    from inference.model_source import resolve_model

    try:
        secret = read_secret(args.secret_file)  # before the model loads: a missing secret fails fast
        backend = resolve_backend(args.backend)
        if backend == "mlx" and args.tp != 1:
            raise ValueError("--backend mlx runs its layers in one process: drop --tp")
        if args.adapter and backend != "mlx":
            raise ValueError("--adapter is served by the MLX backend: add --backend mlx")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        n = read_config(resolve_model(args.model)).num_layers
        rng = LayerRange(args.layers[0], args.layers[1], n, embed=False, head=False)
        runner: Runner | None = None
        if backend == "mlx":
            from inference.mlx.runner import MLXRunner

            on_mlx = MLXRunner.load(
                args.model, args.dtype, rng, args.num_blocks, args.block_size, args.quant, args.adapter
            )
            loaded, runner = on_mlx.loaded, on_mlx
        elif args.tp != 1:
            from inference.tp_runner import start_tp

            group = start_tp(
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
            loaded, runner = group.loaded, group
        else:
            loaded = load_model(args.model, args.dtype, args.device, layers=rng, attn=args.attn, quant=args.quant)
        node_id = args.node_id or f"stage-{rng.start}-{rng.end}"
        servicer = StageServicer(node_id, args.device)
        limits = stage_limits(loaded, args.num_blocks, args.block_size, args.max_batch, args.max_batch_tokens)
        keys = StageKeys.from_secret(secret, node_id)
        servicer.install(
            loaded, args.num_blocks, args.block_size, args.dtype, args.next_hop, runner, keys=keys, limits=limits
        )
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
