"""What an MLX node reports about itself: its device and a quick matmul speed (the planner's
input, measured the way cluster.worker measures a torch device)."""

from __future__ import annotations

import time

import mlx.core as mx


def device_name() -> str:
    """Where MLX runs this process's arrays: "gpu" (Metal, Apple silicon) or "cpu"."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def matmul_gflops(n: int = 512, reps: int = 8) -> float:
    a = mx.random.normal((n, n))
    mx.eval(a @ a)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ a)
    return round(reps * 2 * n**3 / (time.perf_counter() - t) / 1e9, 1)
