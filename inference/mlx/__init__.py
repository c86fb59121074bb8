"""The MLX backend: our Llama/Qwen2 stage models in MLX (Metal on Apple silicon, CPU elsewhere).

It plugs in at the `Runner` seam (inference/runner.py): `MLXRunner` takes the same
`StepInputs` (positions, cache slots, block tables the master's KV manager decided) and
returns torch hidden states and float32 logits, so the Engine, its scheduler and sampler,
and the gRPC stage server drive it unchanged. Tensors are converted only at that edge
(convert.py). Nothing here imports mlx at module level except the files that compute, so
`--backend` parsing and the error for a missing install stay cheap."""

from __future__ import annotations

import importlib.util
import platform
import sys

BACKENDS = ("auto", "torch", "mlx")


def available() -> bool:
    """Whether `mlx.core` can be imported (find_spec first: a missing package costs nothing)."""
    if importlib.util.find_spec("mlx") is None:
        return False
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def missing_reason() -> str:
    """The one line a process prints when `--backend mlx` is asked for without mlx."""
    pkg = '"mlx"' if apple_silicon() else '"mlx[cpu]"'
    return f"--backend mlx needs the mlx package, which is not installed: pip install {pkg}"


def resolve_backend(requested: str) -> str:
    """`auto`: MLX on Apple silicon when it is installed, torch everywhere else. Raises
    ValueError (with `missing_reason`) for `mlx` without mlx installed."""
    if requested not in BACKENDS:
        raise ValueError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "mlx" if apple_silicon() and available() else "torch"
    if requested == "mlx" and not available():
        raise ValueError(missing_reason())
    return requested
