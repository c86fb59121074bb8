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
    """NodeInfo by node_id. Invariant: every stored NodeInfo's node_id equals its key.
    Safe to use from the event loop, the model thread and control handlers at once;
    `snapshot()` hands out copies, so readers never see a half-applied update."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeInfo] = {}
        self._lock = threading.Lock()

    def add(self, node: NodeInfo) -> None:
        """Insert or replace a node (a worker that reconnects re-adds itself)."""
        with self._lock:
            self._nodes[node.node_id] = replace(node)

    def update(self, node_id: str, **changes) -> NodeInfo:
        """Change some fields of a known node; raises KeyError for an unknown id.
        `replace` re-runs validation, so a bad change leaves the stored node untouched."""
        with self._lock:
            node = replace(self._nodes[node_id], **changes)
            if node.node_id != node_id:
                raise ValueError("node_id cannot change; add a new node instead")
            self._nodes[node_id] = node
            return replace(node)

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
