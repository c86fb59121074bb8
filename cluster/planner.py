"""Memory-aware layer split: which node runs which decoder layers.

The master keeps the embedding, the final norm, the LM head and sampling; decoder layers
[0, num_layers) go to worker nodes as contiguous ranges in pipeline order, every layer exactly
once. `plan_layers` is a pure function of numbers (no torch, no I/O), so the split can be
tested exhaustively and shown on the status page before a single weight is loaded.

Cost model: a node holding n layers needs `n * cost.per_layer + cost.activation_bytes +
reserve_bytes`. Weights and KV scale with the layer count; the activation working set is
paid once per stage, because a stage runs its layers one after another and each layer's
temporaries are freed before the next one starts."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeGuard

from inference.config import LayerRange, ModelConfig

GiB = 1 << 30
MiB = 1 << 20


class PlanError(Exception):
    """The layers cannot be placed. The message names the node and/or the memory missing;
    `node_id` and `missing_bytes` carry the same facts for the status page."""

    def __init__(self, message: str, *, node_id: str | None = None, missing_bytes: int = 0):
        super().__init__(message)
        self.node_id = node_id
        self.missing_bytes = missing_bytes


def format_bytes(n: int) -> str:
    """GiB with 1-2 decimals; below 0.01 GiB in MiB, so a real shortfall never reads 0.00 GiB."""
    if n >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= GiB // 100:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.2f} MiB"


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """One node as the planner sees it. `layers` is an override: a layer count (placed
    contiguously in node order), an explicit [start, end) range, or None for automatic."""

    node_id: str
    free_bytes: int
    layers: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise PlanError(f"node id must be a non-empty string, got {self.node_id!r}")
        if not _is_int(self.free_bytes) or self.free_bytes < 0:
            raise PlanError(f"node {self.node_id}: free_bytes must be an integer >= 0, got {self.free_bytes!r}")
        lay = self.layers
        if isinstance(lay, list):  # JSON has no tuples; accept [start, end] from a status/flag payload
            lay = tuple(lay)
            object.__setattr__(self, "layers", lay)
        if lay is None:
            return
        if _is_int(lay):
            if lay < 0:
                raise PlanError(f"node {self.node_id}: layer count must be >= 0, got {lay}", node_id=self.node_id)
            return
        if isinstance(lay, tuple) and len(lay) == 2 and all(_is_int(x) for x in lay):
            if not 0 <= lay[0] < lay[1]:
                raise PlanError(
                    f"node {self.node_id}: layer range [{lay[0]}, {lay[1]}) is empty or negative", node_id=self.node_id
                )
            return
        raise PlanError(
            f"node {self.node_id}: layers must be a count, a (start, end) range or None, got {lay!r}",
            node_id=self.node_id,
        )


@dataclass(frozen=True, slots=True)
class LayerCost:
    """Bytes one decoder layer costs: its weights, its KV cache for the shared block pool,
    and the activation working set of one forward step (paid once per stage, see module doc)."""

    weight_bytes: int
    kv_bytes: int
    activation_bytes: int

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "kv_bytes", "activation_bytes"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise PlanError(f"{name} must be an integer >= 0, got {v!r}")
        if self.per_layer <= 0:
            raise PlanError("a layer must cost at least one byte of weights or KV cache")

    @property
    def per_layer(self) -> int:
        """What each additional layer on a node costs (weights + KV); excludes activations."""
        return self.weight_bytes + self.kv_bytes

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, dtype_bytes: int, num_blocks: int, block_size: int, max_batch_tokens: int
    ) -> LayerCost:
        for name, v in (
            ("dtype_bytes", dtype_bytes),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("max_batch_tokens", max_batch_tokens),
        ):
            if not _is_int(v) or v < 1:
                raise PlanError(f"{name} must be an integer >= 1, got {v!r}")
        h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q = cfg.num_heads * d
        kv = cfg.num_kv_heads * d
        qkv = q + 2 * kv
        params = (
            h * qkv
            + (qkv if cfg.qkv_bias else 0)  # fused q/k/v projection (+ Qwen2's bias)
            + q * h  # o_proj
            + h * 2 * inter
            + inter * h  # gate_up, down
            + 2 * h
        )  # input and post-attention RMSNorm
        # Every stage keeps K and V of its layers for the SAME blocks (the master's pool is shared).
        kv_bytes = num_blocks * cfg.kv_block_bytes(1, block_size, dtype_bytes)
        # Peak live tensors while one layer runs on T = max_batch_tokens tokens: the residual
        # stream and its normed copy (2h), plus the larger of attention's q/k/v and output
        # (qkv + q) and the MLP's gate_up and activated product (3 * inter). Assumes a fused
        # attention kernel (SDPA/flash: no T x T score matrix) and no autograd graph.
        act = max_batch_tokens * dtype_bytes * (2 * h + max(qkv + q, 3 * inter))
        return cls(params * dtype_bytes, kv_bytes, act)


@dataclass(frozen=True, slots=True)
class Assignment:
    """Node `node_id` runs layers [start, end); it needs `bytes_needed` of its `free_bytes`."""

    node_id: str
    start: int
    end: int
    bytes_needed: int
    free_bytes: int

    def __post_init__(self) -> None:
        if not (_is_int(self.start) and _is_int(self.end) and 0 <= self.start < self.end):
            raise PlanError(f"node {self.node_id}: bad layer range [{self.start}, {self.end})", node_id=self.node_id)
        if self.bytes_needed > self.free_bytes:  # the invariant every plan keeps, checked at the door
            raise PlanError(
                f"node {self.node_id}: assignment needs {format_bytes(self.bytes_needed)}, has "
                f"{format_bytes(self.free_bytes)} free",
                node_id=self.node_id,
                missing_bytes=self.bytes_needed - self.free_bytes,
            )

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Plan:
    """Assignments in pipeline order (by layer): contiguous, covering [0, num_layers) exactly
    once, one per node. Nodes that got no layers are not listed."""

    num_layers: int
    assignments: tuple[Assignment, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "assignments", tuple(self.assignments))
        at = 0
        for a in self.assignments:
            if a.start != at:
                raise PlanError(f"plan is not contiguous: node {a.node_id} starts at layer {a.start}, expected {at}")
            at = a.end
        if at != self.num_layers:
            raise PlanError(f"plan covers layers [0, {at}) of {self.num_layers}")
        ids = [a.node_id for a in self.assignments]
        if len(set(ids)) != len(ids):
            raise PlanError(f"plan lists a node twice: {ids}")

    def layer_range(self, node_id: str) -> LayerRange | None:
        """The node's layers as the loader wants them, or None if the node holds no layers.
        Workers never embed nor run the LM head: the master keeps both ends of the pipeline."""
        for a in self.assignments:
            if a.node_id == node_id:
                return LayerRange(a.start, a.end, self.num_layers, embed=False, head=False)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "assignments": [
                {
                    "node_id": a.node_id,
                    "start": a.start,
                    "end": a.end,
                    "layers": a.num_layers,
                    "bytes_needed": a.bytes_needed,
                    "free_bytes": a.free_bytes,
                }
                for a in self.assignments
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            data["num_layers"],
            tuple(
                Assignment(a["node_id"], a["start"], a["end"], a["bytes_needed"], a["free_bytes"])
                for a in data["assignments"]
            ),
        )


def plan_layers(num_layers: int, cost: LayerCost, nodes: list[NodeCapacity], reserve_bytes: int = 0) -> Plan:
    """Split decoder layers [0, num_layers) over `nodes` (pipeline order = list order).

    Overrides first: ranges are placed where they say; counts and automatic nodes then fill
    the remaining layers in node order, a count taking exactly its count, automatic nodes
    sharing the rest in proportion to the layers each can fit. When range overrides exist the
    pipeline follows layer order and the other nodes keep their relative order. Raises
    PlanError, naming the node and/or the memory missing, when no such plan fits."""
    if not _is_int(num_layers) or num_layers < 1:
        raise PlanError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if not _is_int(reserve_bytes) or reserve_bytes < 0:
        raise PlanError(f"reserve_bytes must be an integer >= 0, got {reserve_bytes!r}")
    if not nodes:
        raise PlanError(f"cannot place {num_layers} layers: no nodes")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise PlanError(f"node ids must be unique, got {ids}")
    per, overhead = cost.per_layer, cost.activation_bytes + reserve_bytes

    def need(n: int) -> int:
        return n * per + overhead if n else 0

    def fits(n: NodeCapacity) -> int:
        return max(0, (n.free_bytes - overhead) // per)

    # Range overrides in layer order, each paired with its range; `others` hold a count or
    # nothing, and `counts` is their override (None: automatic), index-aligned with `others`.
    ranged = sorted(((n, n.layers) for n in nodes if isinstance(n.layers, tuple)), key=lambda nr: nr[1][0])
    others = [n for n in nodes if not isinstance(n.layers, tuple)]
    counts = [n.layers for n in nodes if not isinstance(n.layers, tuple)]
    for n, (s, e) in ranged:
        if e > num_layers:
            raise PlanError(
                f"node {n.node_id}: override range [{s}, {e}) is outside the model's layers [0, {num_layers})",
                node_id=n.node_id,
            )
    for (left, lr), (right, rr) in zip(ranged, ranged[1:]):
        if rr[0] < lr[1]:
            raise PlanError(
                f"nodes {left.node_id} and {right.node_id}: override ranges [{lr[0]}, {lr[1]}) "
                f"and [{rr[0]}, {rr[1]}) overlap",
                node_id=right.node_id,
            )
    for n in nodes:
        count = n.layers[1] - n.layers[0] if isinstance(n.layers, tuple) else n.layers
        if count and need(count) > n.free_bytes:
            missing = need(count) - n.free_bytes
            raise PlanError(
                f"node {n.node_id}: override {count} layers needs {format_bytes(need(count))}, has "
                f"{format_bytes(n.free_bytes)} free (missing {format_bytes(missing)})",
                node_id=n.node_id,
                missing_bytes=missing,
            )

    gaps, at = [], 0  # the layers no range claims, as [start, end) runs in layer order
    for _, (s, e) in ranged:
        if s > at:
            gaps.append((at, s))
        at = e
    if at < num_layers:
        gaps.append((at, num_layers))
    open_layers = sum(e - s for s, e in gaps)
    claimed = sum(c for c in counts if c is not None)
    if claimed > open_layers:
        raise PlanError(
            f"count overrides claim {claimed} layers but only {open_layers} of {num_layers} "
            f"are left after range overrides"
        )
    autos = [n for n in others if n.layers is None]
    rest = open_layers - claimed
    if rest > sum(fits(n) for n in autos):
        if not autos:
            raise PlanError(
                f"{rest} of {num_layers} layers have no node: every node has an override "
                f"and together they cover {num_layers - rest}"
            )
        _raise_short(num_layers, rest, autos, per, overhead)

    lo = [c if c is not None else 0 for c in counts]
    hi = [c if c is not None else fits(n) for n, c in zip(others, counts)]
    groups = _partition(others, lo, hi, [e - s for s, e in gaps])
    if groups is None:
        # Totals fit, but each node takes one contiguous run: say what had to be covered by whom.
        fit = ", ".join(f"{n.node_id} {'takes' if n.layers is not None else 'fits'} {h}" for n, h in zip(others, hi))
        raise PlanError(
            f"cannot lay out the layers contiguously: the runs left by range overrides are "
            f"{', '.join(f'[{s}, {e})' for s, e in gaps)}, to be covered in node order by one "
            f"run per node ({fit or 'no nodes'})"
        )
    assignments = [Assignment(n.node_id, s, e, need(e - s), n.free_bytes) for n, (s, e) in ranged]
    auto = [n.layers is None for n in others]
    for (start, end), (a, b) in zip(gaps, groups):
        for i, k in zip(range(a, b), _split(end - start, lo[a:b], hi[a:b], auto[a:b])):
            if k:  # nodes that get no layers are left out of the plan
                assignments.append(Assignment(others[i].node_id, start, start + k, need(k), others[i].free_bytes))
                start += k
    return Plan(num_layers, tuple(sorted(assignments, key=lambda a: a.start)))


def _raise_short(num_layers: int, rest: int, autos: list[NodeCapacity], per: int, overhead: int) -> None:
    """The automatic nodes cannot hold `rest` layers: say how much memory is missing."""
    usable = [n.free_bytes - overhead for n in autos]
    fit = sum(max(0, u) // per for u in usable)
    needed, have = rest * per, sum(max(0, u) for u in usable)
    what = f"{rest} layers" if rest == num_layers else f"the {rest} layers left by overrides (of {num_layers})"
    if needed > have:
        missing = needed - have
        raise PlanError(
            f"cannot place {what}: need {format_bytes(missing)} more (nodes have {format_bytes(have)} free for "
            f"{format_bytes(needed)} of layers, at {format_bytes(per)} a layer, after keeping "
            f"{format_bytes(overhead)} a node for activations and reserve)",
            missing_bytes=missing,
        )
    # Enough bytes in total, but spread so that no node has room for another whole layer:
    # name the single node that needs the least extra memory to take every missing layer.
    short = rest - fit

    def top_up(n: NodeCapacity) -> int:
        return (max(0, n.free_bytes - overhead) // per + short) * per + overhead - n.free_bytes

    best = min(autos, key=top_up)
    raise PlanError(
        f"cannot place {what}: the nodes fit {fit}, because free memory is split so that no node has room "
        f"for another layer ({format_bytes(per)} each); node {best.node_id} needs {format_bytes(top_up(best))} "
        f"more to take the other {short}",
        node_id=best.node_id,
        missing_bytes=top_up(best),
    )


def _partition(
    others: list[NodeCapacity], lo: list[int], hi: list[int], gaps: list[int]
) -> list[tuple[int, int]] | None:
    """Cut `others` (in order) into len(gaps) consecutive non-empty groups, group j covering gap j
    exactly (sum lo <= gap <= sum hi). Of the feasible cuts, take the one whose busiest group
    has the lowest automatic load, so no run of nodes is squeezed while another idles. Node
    lists are short (tens), so an O(gaps * nodes^2) DP is plenty. None when nothing fits."""
    m, k = len(others), len(gaps)
    if k == 0:
        return [] if not any(lo) else None
    plo, phi, pauto = [0], [0], [0]
    for i, n in enumerate(others):
        plo.append(plo[-1] + lo[i])
        phi.append(phi[-1] + hi[i])
        pauto.append(pauto[-1] + (hi[i] if n.layers is None else 0))
    best: list[list[Fraction | None]] = [[None] * (m + 1) for _ in range(k + 1)]
    back = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = Fraction(0)
    for j in range(1, k + 1):
        g = gaps[j - 1]
        for b in range(j, m + 1):
            for a in range(j - 1, b):
                prev = best[j - 1][a]
                if prev is None or not plo[b] - plo[a] <= g <= phi[b] - phi[a]:
                    continue
                auto = pauto[b] - pauto[a]
                load = max(prev, Fraction(g - (plo[b] - plo[a]), auto) if auto else Fraction(0))
                cur = best[j][b]
                if cur is None or load < cur:
                    best[j][b], back[j][b] = load, a
    if best[k][m] is None:
        return None
    cuts, b = [], m
    for j in range(k, 0, -1):
        cuts.append((back[j][b], b))
        b = back[j][b]
    return cuts[::-1]


def _split(total: int, lo: list[int], hi: list[int], auto: list[bool]) -> list[int]:
    """Layers per node for one group: counts get their count; automatic nodes share the rest in
    proportion to their capacity `hi` (largest-remainder rounding, so shares sum exactly and a
    share never exceeds its capacity: rest <= sum of capacities)."""
    out = list(lo)
    rest = total - sum(lo)
    cap = sum(h for h, a in zip(hi, auto) if a)
    if rest == 0:
        return out
    rems = []
    for i, (h, a) in enumerate(zip(hi, auto)):
        if a:
            q, r = divmod(rest * h, cap)
            out[i] += q
            rems.append((-r, -h, i))
    for _, _, i in sorted(rems)[: total - sum(out)]:
        out[i] += 1
    return out
