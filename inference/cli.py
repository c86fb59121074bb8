"""The command-line flags that the master (app.py), the worker, a hand-run stage server and
`inference.generate` share: defined once here, so their names, choices, defaults and help
never drift apart. Light on purpose (no torch import): `--help` and flag errors stay fast."""

from __future__ import annotations

import argparse
import logging

from .config import ATTN_BACKENDS, DTYPE_NAMES, QUANT_CHOICES
from .mlx import BACKENDS
from .model_source import DEFAULT_MODEL

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _int_at_least(value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
    return n


def positive_int(value: str) -> int:
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0)


def port_number(value: str) -> int:
    """A TCP port; 0 means any free one."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{n} is not a valid port (0-65535)")
    return n


def add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="local HF dir, .gguf file, HF hub repo id, or 'smollm2' (ships offline)"
    )


def add_compute(p: argparse.ArgumentParser, device_default: str = "cpu") -> None:
    """--dtype, --device, --attn: how this process runs its layers."""
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="compute dtype")
    p.add_argument("--device", default=device_default, help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--attn",
        choices=ATTN_BACKENDS,
        default="sdpa",
        help="attention backend (xformers/flash need CUDA; fall back to sdpa)",
    )


def add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="auto",
        help="weights: int8 / int4 packed for this CPU's fastest kernel, none = float (exact parity); "
        "auto keeps a GGUF source quantized (4-bit blocks -> int4) on CPU and float otherwise",
    )


def add_kv_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="KV cache budget in GiB (default: enough for --max-batch full contexts, at most "
        "min(1 GiB, 25%% of free RAM) on CPU or 80%% of free GPU memory)",
    )


def add_prefix_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="recompute every prompt in full instead of reusing the KV of prefixes seen before "
        "(shared system prompts, earlier turns of a conversation)",
    )


def add_tp(p: argparse.ArgumentParser, help_extra: str = "") -> None:
    p.add_argument(
        "--tp",
        type=positive_int,
        default=1,
        metavar="N",
        help="tensor parallel: split every layer over N processes on this machine (gloo on CPU, "
        "nccl on CUDA)" + (f"; {help_extra}" if help_extra else ""),
    )


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging verbosity")


def setup_logging(level: str, **kw) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, **kw)


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the layers: torch, or mlx (Metal on Apple silicon, CPU elsewhere; needs the mlx "
        "package); auto picks mlx on Apple silicon where it is installed, torch everywhere else",
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="serve a LoRA adapter (python -m inference.mlx.lora writes one) on top of the weights; "
        "MLX backend only; a pipeline stage applies its own layers' part",
    )


def add_images(p: argparse.ArgumentParser) -> None:
    """How a vision model's pictures are read (the master only: stages never see pixels)."""
    p.add_argument(
        "--min-pixels",
        type=positive_int,
        default=None,
        help="vision models: smaller pictures are upscaled to about this many pixels (unset: the model's own)",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=28 * 28 * 1280,
        help="vision models: larger pictures are downscaled to about this many pixels, which bounds the "
        "image tokens per picture (pixels / 784 for Qwen2-VL: 1280 by default; Qwen2-VL's own setting, "
        "12845056, would let one photo take 16384 tokens)",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let chat requests name pictures by http(s) URL, fetched by this server (timeout, size cap, "
        "public addresses only); without it only data: URLs are read",
    )
    p.add_argument(
        "--max-image-mb",
        type=positive_int,
        default=8,
        help="largest picture a request may send, encoded (a data: URL's request body may be 4/3 of it)",
    )
