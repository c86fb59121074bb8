"""What the model thread measures about the tokens it produces, for GET /metrics: time to
first token, inter-token latency (histograms) and prompt tokens prefilled.

Measured where tokens are made (the model loop), so every way in (the OpenAI routes, the
Responses API, the web chat) is counted the same, and an event loop busy with other clients
does not blur the numbers. The cost is a few float operations per token and no lock: one
thread writes, and readers take snapshots. The text format lives in ui/metrics.py."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

# Upper bounds in seconds: a small model on a GPU makes a token every few milliseconds, a CPU
# or a pipeline across machines every 50-500 ms, and a first token can wait behind a full
# queue, or for a lost stage to be replaced, up to a minute.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """`counts[i]`: observations in bucket i, that is at most `bounds[i]` and above the bound
    before it; the last count is of those above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.bounds)} bounds need {len(self.bounds) + 1} counts, got {len(self.counts)}")

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Prometheus' buckets: observations <= each bound, then <= +Inf (all of them)."""
        return list(accumulate(self.counts))


class Histogram:
    """Observations counted in fixed buckets, each an inclusive upper bound (Prometheus' `le`).

    Invariant: one thread observes; any thread may `snapshot()`. A snapshot's counts are
    consistent with each other (copied in one step under the GIL) and its count is their sum,
    so its buckets always add up; its sum may lack the observation being recorded."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S):
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"bounds must be finite numbers, at least one: {bounds!r}")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds must increase strictly: {bounds!r}")
        self._bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count `value` `times` times (a step that made several tokens at once)."""
        self._counts[bisect_left(self._bounds, value)] += times
        self._sum += value * times

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self._bounds, tuple(self._counts), self._sum)


class TokenMetrics:
    """Per-token latencies of every engine request, measured in the model thread.

    `ttft`: from admission to the end of the step that produced a request's first token
    (queueing, prefill, any wait for a lost stage). `itl`: between a request's consecutive
    tokens; a step that yields k tokens counts k gaps of a k-th of its time each, so a
    request of n tokens adds exactly n - 1 to the count. `prompt_tokens`: the prompts of
    requests that reached their first token.

    Invariant: only the model thread calls `first_tokens` and `next_tokens`."""

    __slots__ = ("ttft", "itl", "prompt_tokens")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.ttft = Histogram(bounds)
        self.itl = Histogram(bounds)
        self.prompt_tokens = 0

    def first_tokens(self, seconds: float, num_tokens: int, num_prompt_tokens: int) -> None:
        """A request's first output: `num_tokens` tokens, `seconds` after its admission."""
        self.ttft.observe(seconds)
        if num_tokens > 1:
            self.itl.observe(0.0, num_tokens - 1)
        self.prompt_tokens += num_prompt_tokens

    def next_tokens(self, seconds: float, num_tokens: int) -> None:
        """A later output: `num_tokens` tokens, `seconds` after the request's previous one."""
        self.itl.observe(seconds / num_tokens, num_tokens)
