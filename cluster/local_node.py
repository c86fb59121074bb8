"""The master as a node: its NodeInfo, built from the AsyncEngine it runs.

The master's row sits in the same registry as the workers' (which the control channel
fills); its heartbeat is simply "now" each time it is refreshed."""

from __future__ import annotations

import logging
import time
from collections import deque

import psutil

from inference.async_engine import AsyncEngine

from .registry import NodeInfo, NodeRegistry, NodeState

log = logging.getLogger(__name__)

MASTER_ID = "master"


class RateMeter:
    """Tokens per second over a sliding window of (time, cumulative count) samples.
    Invariant: samples are in time order and span at most `window_s` (plus one older
    sample kept as the baseline)."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> float | None:
        """Record the cumulative count at `now`; returns the rate, None until two samples."""
        if self._samples and total < self._samples[-1][1]:
            self._samples.clear()  # the counter restarted (engine re-attached)
        self._samples.append((now, total))
        # Keep one sample at or before the window start so the rate covers the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        if now - t0 <= 0:
            return None
        return (total - n0) / (now - t0)


def memory_bytes(device: str) -> tuple[int, int]:
    """(used, free) for the device the layers live on: GPU memory on CUDA, else this
    process's RSS and the system's available memory."""
    if device.startswith("cuda"):
        try:
            import torch

            free, total = torch.cuda.mem_get_info(torch.device(device))
            return total - free, free
        except Exception as e:  # a status page must not fail on a driver hiccup
            log.warning("cuda memory query failed: %s", e)
    return psutil.Process().memory_info().rss, psutil.virtual_memory().available


class MasterNode:
    """Builds the master's NodeInfo and writes it into a registry on `refresh()`."""

    def __init__(self, engine: AsyncEngine, address: str, node_id: str = MASTER_ID):
        self.engine = engine
        self.address = address
        self.node_id = node_id
        self._rate = RateMeter()

    def info(self, now: float | None = None) -> NodeInfo:
        now = time.monotonic() if now is None else now
        stats = self.engine.stats()
        info = self.engine.info()
        if info is None:  # still loading: nothing to report but who we are
            device, start, end = "?", 0, 0
        else:
            device, start, end = info.device, info.layer_start, info.layer_end
        used, free = memory_bytes(device)
        rate = self._rate.add(now, stats.generated_tokens)
        return NodeInfo(
            node_id=self.node_id,
            address=self.address,
            backend=info.backend if info is not None else "torch",
            device=device,
            model=self.engine.model_name,
            layer_start=start,
            layer_end=end,
            mem_used_bytes=used,
            mem_free_bytes=free,
            state=NodeState.READY if self.engine.ready else NodeState.LOADING,
            last_heartbeat=now,
            rtt_ms=None,
            tok_s=max(0.0, rate) if rate is not None else None,
        )

    def refresh(self, registry: NodeRegistry, now: float | None = None) -> NodeInfo:
        node = self.info(now)
        registry.add(node)
        return node
