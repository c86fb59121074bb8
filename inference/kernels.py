"""The decode step's fused CPU kernels (csrc/cpu_ops.cpp), each next to the torch code it
replaces, which is also what runs where the kernels cannot: on a GPU, with no C++ compiler,
or with RINGLLM_KERNELS=torch.

Why native code: a decode step of a small model on CPU is mostly per-op overhead, not
arithmetic (the default model, int4, 2 cores: 16 ms of layers, of which 8 ms are matmuls and
the rest about 50 small torch ops per layer). One loop per kernel replaces a run of them.

The library is compiled once per machine with the C++ compiler torch uses (about 15 s) into
~/.cache/ringllm/kernels/<hash of the source, torch and the CPU>/, then loaded in well under a
second. Each process builds in a folder of its own and renames the result into place, so
concurrent first starts never wait on each other's lock, and a build killed halfway leaves
nothing behind that a later start would trust."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .layers.rotary import apply_rotary

log = logging.getLogger(__name__)

# The elementwise and attention kernels, the quantized matmuls (and their AMX tile path), and a
# decode step's whole layer built from them (one library; ops.h declares what
# decode_layer.cpp calls).
SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "cpu_ops.cpp",
        "quant_ops.cpp",
        "quant_amx.cpp",
        "quant_amx_bf16.cpp",
        "decode_layer.cpp",
        "argmax.cpp",
    )
]
LIB_NAME = "ringllm_cpu_ops"
# -ffp-contract=off: no fused multiply-adds, so float32 RoPE and residual adds round exactly
# as torch's separate ops do; -fno-trapping-math (results unchanged) lets the exp loops vectorize.
# -fopenmp: at::parallel_for is a header template that runs serially without it; the library
# then shares torch's own OpenMP runtime (same soname, already loaded), so one thread pool.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", *OPENMP] + (
    ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
)

_lock = threading.Lock()
_state: dict[str, bool | str] = {}  # "ok": loaded?, "why": the reason when not
_off = False  # set by torch_ops_only()


def cache_dir() -> Path:
    """Where this machine's build lives: a hash of the source, the flags, torch and the CPU,
    so an upgrade or a home folder shared by different CPUs never loads a stale build."""
    from .layers.quant import cpu_flags  # which imports this module

    key = hashlib.sha256()
    for source in [*SOURCES, *sorted(SOURCES[0].parent.glob("*.h"))]:
        key.update(source.read_bytes())
    for part in (" ".join(CFLAGS), torch.__version__, sys.version):
        key.update(part.encode())
    key.update(" ".join(sorted(cpu_flags())).encode())
    root = Path(os.environ.get("RINGLLM_CACHE", Path.home() / ".cache" / "ringllm"))
    return root / "kernels" / key.hexdigest()[:16]


def _build(target: Path) -> None:
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the ninja wheel's binary, in a venv that is not activated
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        # Loads the library into this process too (is_python_module=False: TORCH_LIBRARY ops).
        built = load(
            LIB_NAME,
            [str(s) for s in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=OPENMP,
            build_directory=str(work),
            is_python_module=False,
        )
        os.replace(built, target)  # atomic: another process sees all of it or nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load() -> bool:
    """Build (once per machine) and load the kernels; False, with the reason logged, where
    they cannot be used. Safe to call from any thread, any number of times."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if os.environ.get("RINGLLM_KERNELS", "native") == "torch":
            _state.update(ok=False, why="RINGLLM_KERNELS=torch")
        else:
            target = cache_dir() / f"{LIB_NAME}.so"
            try:
                if target.exists():
                    torch.ops.load_library(str(target))
                else:
                    log.info("compiling the fused CPU kernels (once per machine, about 15 s)")
                    t = time.perf_counter()
                    _build(target)
                    log.info("compiled the fused CPU kernels in %.1f s into %s", time.perf_counter() - t, target.parent)
                _state.update(ok=True)
            except Exception as e:  # no compiler, no ninja, a failed build: torch ops still work
                last = (str(e).strip().splitlines() or [""])[-1]  # a compiler's log ends with the cause
                _state.update(ok=False, why=f"{type(e).__name__}: {last}")
        if _state["ok"]:
            log.info("decode step: fused CPU kernels")
        else:
            log.warning("decode step: torch ops only, fused CPU kernels unavailable (%s)", _state["why"])
        return bool(_state["ok"])


def loaded() -> bool:
    """Whether the library is loaded (the quantized matmuls use it even inside
    `torch_ops_only()`, which turns off the fused elementwise kernels only)."""
    return bool(_state.get("ok"))


def available() -> bool:
    """Whether the kernels are loaded and in use (without trying to build them)."""
    return bool(_state.get("ok")) and not _off


@contextlib.contextmanager
def torch_ops_only():
    """Run the torch code instead of the kernels inside the block (tests and benchmarks
    compare the two in one process)."""
    global _off
    _off = True
    try:
        yield
    finally:
        _off = False


def _native(x: torch.Tensor) -> bool:
    return available() and x.device.type == "cpu"


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of float32 rows [rows, vocab] (greedy sampling's hot path)."""
    if _native(logits) and logits.dim() == 2 and logits.dtype == torch.float32 and logits.shape[1] > 0:
        return torch.ops.ringllm.argmax(logits)
    return logits.argmax(dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _native(x) and x.dim() == 2 and x.is_contiguous() and weight.dtype == x.dtype:
        return torch.ops.ringllm.rms_norm(x, weight, eps)
    # One fused op where torch has one; it accumulates in float32 for bf16 inputs.
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual), the sum written into `x` (which the caller
    owns: a layer's fresh output), so the residual stream needs no tensor of its own."""
    if _native(x) and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous() and weight.dtype == x.dtype:
        return torch.ops.ringllm.add_rms_norm_(x, residual, weight, eps), x
    x = x.add_(residual)
    return F.rms_norm(x, weight.shape, weight, eps), x


def rope_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotates the query and key heads of qkv [T, q_heads + 2 kv_heads, D] (RoPE, `cos_sin`
    [T, 2, D] from RotaryEmbedding.cos_sin), writes keys and values to their cache slots, and
    returns the rotated (q, k) and v as views of the step's tensors."""
    k_cache, v_cache = kv_cache
    h, kv = q_heads, kv_heads
    if _native(qkv) and qkv.is_contiguous() and cos_sin.is_contiguous():
        torch.ops.ringllm.rope_kv(qkv, cos_sin, k_cache, v_cache, slot_mapping, h, kv)
        qk = qkv
    else:
        qk = apply_rotary(qkv[:, : h + kv], (cos_sin[:, :1], cos_sin[:, 1:]))
        k_cache.view(-1, kv, qkv.shape[-1]).index_copy_(0, slot_mapping, qk[:, h:].to(k_cache.dtype))
        v_cache.view(-1, kv, qkv.shape[-1]).index_copy_(0, slot_mapping, qkv[:, h + kv :].to(v_cache.dtype))
    return qk[:, :h], qk[:, h : h + kv], qkv[:, h + kv :]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: list[int],
    scale: float,
) -> torch.Tensor | None:
    """One query per sequence [n, H, D] against its cached context, read from the blocks in
    place; None where the kernels cannot run it (the caller gathers and uses SDPA)."""
    if not _native(q) or not block_tables.is_contiguous():
        return None
    return torch.ops.ringllm.decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on the merged gate/up projection's output [T, 2 I]."""
    if _native(x) and x.dim() == 2 and x.is_contiguous():
        return torch.ops.ringllm.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


if __name__ == "__main__":  # scripts/setup.sh: build now rather than at the first start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(0 if load() else 1)
