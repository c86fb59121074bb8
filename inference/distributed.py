"""The tensor-parallel (TP) group of one stage: N ranks on one machine, torch.distributed.

The default process group *is* the stage's TP group (a process belongs to at most one):
layers read `tp_rank()` / `tp_size()` when they are built, and no group means TP 1, so a
single process never touches torch.distributed. Only tensor collectives are used — no
`*_object` collectives, nothing pickled.

Binding: every rank lives on the same machine, so the rendezvous store and gloo's sockets
use the stage's advertised address (`--host`, 127.0.0.1 by default) and the interface
that holds it: `GLOO_SOCKET_IFNAME` (and `NCCL_SOCKET_IFNAME` for NCCL's bootstrap) are set
to that interface unless the user already set them. A wildcard or unknown host falls back
to loopback, which is also what an all-local group needs."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket

import psutil
import torch
import torch.distributed as dist

from .config import ModelConfig
from .errors import UnsupportedModel

log = logging.getLogger(__name__)

# Ranks other than 0 wait for the next step inside a broadcast, however long the server
# idles; a dead peer is caught by the watchdogs in tp_runner, not by this timeout.
GROUP_TIMEOUT = datetime.timedelta(days=7)


def tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# -- how layers split ---------------------------------------------------------------------
def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """(start, length) of rank's contiguous share of `total`; the first `total % size`
    ranks take one more (the MLP's intermediate size need not divide by N)."""
    base, extra = divmod(total, size)
    return rank * base + min(rank, extra), base + (rank < extra)


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads a rank holds: a 1/N share, or one replicated head when N exceeds them
    (vLLM's rule: ranks r*KV//N .. share KV head r // (N // KV))."""
    return num_kv_heads // size if num_kv_heads >= size else 1


def kv_head_start(num_kv_heads: int, rank: int, size: int) -> int:
    if num_kv_heads >= size:
        return rank * (num_kv_heads // size)
    return rank // (size // num_kv_heads)


def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    return [
        n for n in range(1, num_heads + 1) if num_heads % n == 0 and (num_kv_heads % n == 0 or n % num_kv_heads == 0)
    ]


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """One-line refusal of a TP size this model cannot be split into."""
    if tp < 1:
        raise UnsupportedModel(f"--tp {tp}: must be >= 1")
    if tp in valid_tp_sizes(cfg.num_heads, cfg.num_kv_heads):
        return
    ok = ", ".join(map(str, valid_tp_sizes(cfg.num_heads, cfg.num_kv_heads)))
    if cfg.num_heads % tp:
        why = f"its {cfg.num_heads} attention heads do not divide by {tp}"
    else:
        why = (
            f"its {cfg.num_kv_heads} KV heads neither divide by {tp} nor divide {tp} "
            f"(KV heads are split, or replicated when N is a multiple of them)"
        )
    raise UnsupportedModel(f"--tp {tp} cannot split this model: {why}; --tp can be {ok}")


# -- collectives (tensors only) -----------------------------------------------------------
def all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """From rank 0 to all: rank 0 sends `t`, the others receive into it."""
    dist.broadcast(t, src=0)
    return t


def gather_last_dim(t: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's `t` along the last dim on rank 0 (None elsewhere)."""
    t = t.contiguous()
    if tp_rank() == 0:
        parts = [torch.empty_like(t) for _ in range(tp_size())]
        dist.gather(t, parts, dst=0)
        return torch.cat(parts, dim=-1)
    dist.gather(t, None, dst=0)
    return None


# -- the group ----------------------------------------------------------------------------
def bind_address(host: str | None) -> str:
    """The address the group uses: `host` if it is an IP of this machine, else loopback."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return "127.0.0.1"
    if ip.is_unspecified or interface_of(str(ip)) is None:
        return "127.0.0.1"
    return str(ip)


def interface_of(addr: str) -> str | None:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == addr for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def pin_interface(addr: str) -> None:
    """Make gloo (and NCCL's bootstrap) listen only on the interface holding `addr`."""
    if name := interface_of(addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Rank r of a CUDA stage uses GPU (base + r): `cuda` and `cuda:0` start at 0."""
    if not device.startswith("cuda"):
        return device
    base = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def init_group(store: dist.Store, rank: int, size: int, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=size, timeout=GROUP_TIMEOUT)
    log.info("TP rank %d of %d joined (%s)", rank, size, backend_for(device))


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
