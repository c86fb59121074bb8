"""Typed node data (petals style) and a thread-safe registry of it.

Pure: no I/O, no clock reads of its own. Callers pass monotonic timestamps in, so the
same data feeds the status page, the status JSON and (later) the layer planner."""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass, replace


class NodeState(enum.Enum):
    JOINING = "joining"  # connected to the master, not yet assigned layers
    LOADING = "loading"  # loading its layer range
    READY = "ready"  # serving its layer range
    LOST = "lost"  # missed its heartbeats; its layers must be re-planned


@dataclass(slots=True)
class NodeInfo:
    """One stage of the pipeline: who it is, which decoder layers [layer_start, layer_end)
    it holds, how much memory it has, and how healthy it looks."""

    node_id: str
    address: str
    backend: str  # compute backend, e.g. "torch"
    device: str  # e.g. "cpu", "cuda:0"
    model: str
    layer_start: int
    layer_end: int
    mem_used_bytes: int
    mem_free_bytes: int
    state: NodeState
    last_heartbeat: float  # time.monotonic() of the last sign of life
    rtt_ms: float | None = None  # None for the master itself (no network hop)
    tok_s: float | None = None  # recent generation rate; None before any sample

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if not isinstance(self.state, NodeState):
            raise ValueError(f"state must be a NodeState, got {self.state!r}")
        # An empty range [0, 0) is allowed: a joining node holds no layers yet.
        if not 0 <= self.layer_start <= self.layer_end:
            raise ValueError(f"layer range [{self.layer_start}, {self.layer_end}) is invalid")
        if self.mem_used_bytes < 0 or self.mem_free_bytes < 0:
            raise ValueError("memory figures must be >= 0")
        for name in ("rtt_ms", "tok_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {v!r}")

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


class NodeRegistry:
    """NodeInfo by node_id. Invariants: every stored NodeInfo's node_id equals its key; at
    most `max_departed` nodes are LOST (a node that goes LOST past that bound evicts the
    departed one seen longest ago), so workers that come and go cannot grow the status page
    without bound. `prune(now)` also forgets departed nodes silent for over `departed_ttl`.
    Safe to use from the event loop, the model thread and control handlers at once;
    `snapshot()` hands out copies, so readers never see a half-applied update."""

    def __init__(self, max_departed: int = 32, departed_ttl: float = 600.0) -> None:
        if max_departed < 0 or not departed_ttl >= 0:
            raise ValueError("need max_departed >= 0 and departed_ttl >= 0")
        self.max_departed = max_departed
        self.departed_ttl = departed_ttl
        self._nodes: dict[str, NodeInfo] = {}
        self._lock = threading.Lock()

    def add(self, node: NodeInfo) -> None:
        """Insert or replace a node (a worker that reconnects re-adds itself)."""
        with self._lock:
            self._nodes[node.node_id] = replace(node)
            self._bound_departed()

    def update(self, node_id: str, **changes) -> NodeInfo:
        """Change some fields of a known node; raises KeyError for an unknown id.
        `replace` re-runs validation, so a bad change leaves the stored node untouched."""
        with self._lock:
            node = replace(self._nodes[node_id], **changes)
            if node.node_id != node_id:
                raise ValueError("node_id cannot change; add a new node instead")
            self._nodes[node_id] = node
            if node.state is NodeState.LOST:
                self._bound_departed()
            return replace(node)

    def prune(self, now: float) -> list[str]:
        """Forget LOST nodes whose last sign of life is over `departed_ttl` before `now`
        (time.monotonic()); returns their ids."""
        with self._lock:
            old = [
                k
                for k, n in self._nodes.items()
                if n.state is NodeState.LOST and now - n.last_heartbeat > self.departed_ttl
            ]
            for k in old:
                del self._nodes[k]
            return old

    def _bound_departed(self) -> None:
        # Caller holds the lock. Departed rows are history: keep the most recent ones.
        lost = [n for n in self._nodes.values() if n.state is NodeState.LOST]
        if len(lost) > self.max_departed:
            lost.sort(key=lambda n: n.last_heartbeat)
            for n in lost[: len(lost) - self.max_departed]:
                del self._nodes[n.node_id]

    def get(self, node_id: str) -> NodeInfo | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return replace(node) if node is not None else None

    def snapshot(self) -> list[NodeInfo]:
        """Copies of all nodes, ordered by first layer then id (pipeline order)."""
        with self._lock:
            nodes = [replace(n) for n in self._nodes.values()]
        return sorted(nodes, key=lambda n: (n.layer_start, n.node_id))

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)
