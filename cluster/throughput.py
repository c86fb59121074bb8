"""Predicted decode speed of a layer plan: which of two plans serves faster, before any
weight moves. The manager asks it whether a worker that joins a serving cluster is worth a
re-plan (a reload, with requests held meanwhile) or should stand by.

A step visits the stages one after another (one step in flight at a time), so a token costs
each stage's compute for its layers plus one network hop per stage and one back to the
master:

    seconds per token = sum over stages (layers x flops_per_layer / speed) + (stages + 1) x hop

`speed` is the matmul rate a worker measured when it joined (Capacity.matmul_gflops); a hop
is half the control channel's measured round trip plus a fixed cost for encoding and copying
the hidden states. Rough by design: it only ranks plans, and a re-plan needs a clear gain
(`MIN_GAIN`). Pure: numbers in, numbers out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .planner import Plan

HOP_OVERHEAD_S = 0.0005  # serialize, send and deserialize one step's hidden states, beyond the wire
DEFAULT_RTT_MS = 1.0  # a worker whose round trip is not measured yet: a LAN
MIN_GFLOPS = 1e-3  # a worker that measured ~0 is slow, not infinitely so
MIN_GAIN = 1.10  # a re-plan reloads weights and holds requests: it must buy 10 % or more


@dataclass(frozen=True, slots=True)
class StageSpeed:
    """What the prediction knows of one worker: its matmul rate and its round trip to us."""

    gflops: float
    rtt_ms: float | None = None

    def hop_seconds(self) -> float:
        rtt = DEFAULT_RTT_MS if self.rtt_ms is None else self.rtt_ms
        return rtt / 2000 + HOP_OVERHEAD_S


def seconds_per_token(plan: Plan, speeds: Mapping[str, StageSpeed], flops_per_layer: float) -> float:
    """Predicted time of one decode step of one sequence through `plan`. A node missing from
    `speeds` raises KeyError: the caller asks only about nodes it knows."""
    compute = sum(
        a.num_layers * flops_per_layer / (max(speeds[a.node_id].gflops, MIN_GFLOPS) * 1e9) for a in plan.assignments
    )
    hops = sum(speeds[a.node_id].hop_seconds() for a in plan.assignments)
    last = plan.assignments[-1].node_id  # the ring's last hop, back to the master
    return compute + hops + speeds[last].hop_seconds()


def gain(current: Plan, candidate: Plan, speeds: Mapping[str, StageSpeed], flops_per_layer: float) -> float:
    """How many times faster `candidate` is predicted to decode than `current` (> 1: faster)."""
    return seconds_per_token(current, speeds, flops_per_layer) / seconds_per_token(candidate, speeds, flops_per_layer)
