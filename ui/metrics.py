"""GET /metrics: the server's counters, gauges and latency histograms in Prometheus' text
format (version 0.0.4).

The exposition is written here, not with prometheus_client: the format is a few lines of
rules, and the client's process-wide default registry is the module-level state we avoid.
What is shown:

- `ringllm_requests_total{endpoint, outcome}`: generation requests (POST to the routes in
  `ENDPOINTS`), counted once each when its answer ends. Outcomes: `ok`; `rejected`, a 429
  (admission control: the queue is full or the request is over a limit); `aborted`, the
  client went away first; `error`, any other failure, also one reported inside a stream
  that had already answered 200. The web chat is not counted here (it is no HTTP request),
  but its tokens and latencies are in everything below.
- `ringllm_prompt_tokens_total`, `ringllm_generation_tokens_total`: tokens prefilled (of the
  requests that reached a first token) and tokens generated.
- `ringllm_requests_waiting`, `ringllm_requests_running`: engine requests (one per choice)
  queued and in the batch; `ringllm_kv_cache_*`: KV cache blocks in use, of how many.
- `ringllm_prefix_cache_*` (unless --no-prefix-cache): tokens looked up and found (hits, as
  vLLM counts them: in tokens), the hit ratio, blocks cached now and blocks evicted.
- `ringllm_time_to_first_token_seconds`, `ringllm_inter_token_latency_seconds`: histograms,
  measured where tokens are made (inference/metrics.py).

With `--api-key`, /metrics needs it too (Prometheus: `authorization: {credentials: KEY}`).
Nothing here names an address or a port."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.async_engine import EngineStats
from inference.metrics import HistogramSnapshot

from .auth import bearer_ok
from .errors import CLIENT_CLOSED, APIError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
OUTCOMES = ("ok", "error", "rejected", "aborted")

router = APIRouter()

# -- the text format ------------------------------------------------------------------------------
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_KINDS = ("counter", "gauge", "histogram", "summary", "untyped")

Labels = Mapping[str, str]


def format_value(value: float) -> str:
    """A sample value as the format spells it: integers bare, floats round-trip, +Inf/-Inf/NaN."""
    if isinstance(value, int):  # bool too: 0 or 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    for name in labels:
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"invalid label name {name!r}")
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Metric families written one after another into the text format: a HELP and a TYPE line
    each, then its samples. A family name may appear once."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def _family(self, name: str, kind: str, help_text: str) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        if kind not in _KINDS:
            raise ValueError(f"invalid metric type {kind!r}")
        if name in self._names:
            raise ValueError(f"metric {name!r} written twice")
        self._names.add(name)
        self._lines += [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]

    def _sample(self, name: str, labels: Labels, value: float) -> None:
        self._lines.append(f"{name}{format_labels(labels)} {format_value(value)}")

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        """A counter, gauge or untyped family: one sample per label set."""
        if kind in ("histogram", "summary"):
            raise ValueError(f"use histogram() for {kind} {name!r}")
        self._family(name, kind, help_text)
        for labels, value in samples:
            self._sample(name, labels, value)

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.add(name, "counter", help_text, [({}, value)])

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.add(name, "gauge", help_text, [({}, value)])

    def histogram(self, name: str, help_text: str, snap: HistogramSnapshot) -> None:
        """`name_bucket{le=...}` cumulative up to le="+Inf", then `name_sum` and `name_count`."""
        self._family(name, "histogram", help_text)
        cumulative = snap.cumulative()
        for bound, n in zip((*snap.bounds, math.inf), cumulative):
            self._sample(f"{name}_bucket", {"le": format_value(float(bound))}, n)
        self._sample(f"{name}_sum", {}, snap.sum)
        self._sample(f"{name}_count", {}, cumulative[-1])

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


# -- requests by outcome ------------------------------------------------------------------------------
class RequestCounts:
    """Generation requests by (endpoint, outcome), every pair present from the start (a
    series that appears only on its first event hides it from rate()).

    Invariant: only the event loop writes (`CountRequests`)."""

    def __init__(self) -> None:
        self._counts = {(e, o): 0 for e in ENDPOINTS for o in OUTCOMES}

    def add(self, endpoint: str, outcome: str) -> None:
        key = (endpoint, outcome)
        if key not in self._counts:
            raise ValueError(f"unknown endpoint or outcome: {key}")
        self._counts[key] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._counts)


@dataclass(slots=True)
class _Answer:
    """What a counted request's answer has done so far."""

    status: int | None = None
    client_gone: bool = False  # an http.disconnect arrived before the answer ended
    stream_failed: bool = False  # set by `stream_failed` after the 200 went out
    counted: bool = False


_SCOPE_KEY = "ringllm.answer"


def stream_failed(scope: Scope) -> None:
    """Report that a stream ended with an in-band error after answering 200, so its request
    counts as an `error` (a no-op for requests that are not counted)."""
    answer = scope.get(_SCOPE_KEY)
    if isinstance(answer, _Answer):
        answer.stream_failed = True


def outcome(status: int | None, client_gone: bool, stream_failed: bool) -> str:
    """The outcome of an answer that ended with `status` (None: it never started)."""
    if client_gone or status == CLIENT_CLOSED:
        return "aborted"
    if status == 429:
        return "rejected"
    if status is None or status >= 400 or stream_failed:
        return "error"
    return "ok"


class CountRequests:
    """Counts each POST to one of `ENDPOINTS` once, in `counts`, by outcome.

    An answer is counted just before its last body message is sent, so a client that has
    read it and then scrapes /metrics sees it counted; one that never sends it (the client
    went away mid-stream, the app raised) is counted when the app returns."""

    def __init__(self, app: ASGIApp, counts: RequestCounts):
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ENDPOINTS:
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"]
        answer = scope[_SCOPE_KEY] = _Answer()

        def count(result: str) -> None:
            if not answer.counted:
                answer.counted = True
                self.counts.add(endpoint, result)

        async def watch_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                answer.client_gone = True
            return message

        async def watch_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count(outcome(answer.status, answer.client_gone, answer.stream_failed))
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        except (ClientDisconnect, OSError, asyncio.CancelledError):
            count("aborted")
            raise
        except BaseException:
            count("error")
            raise
        finally:
            # Returned without finishing the body: Starlette stops a stream when the client leaves.
            count("aborted" if answer.client_gone else "error")


# -- the route ----------------------------------------------------------------------------------------
def render(
    stats: EngineStats,
    prompt_tokens: int,
    ttft: HistogramSnapshot,
    itl: HistogramSnapshot,
    requests: Mapping[tuple[str, str], int],
) -> str:
    """The whole exposition from one snapshot of each source."""
    out = Exposition()
    out.add(
        "ringllm_requests_total",
        "counter",
        "Generation requests by endpoint and outcome (rejected: answered 429 by admission control; "
        "aborted: the client went away first; error: any other failure, also one inside a stream).",
        [({"endpoint": e, "outcome": o}, n) for (e, o), n in requests.items()],
    )
    out.counter(
        "ringllm_prompt_tokens_total",
        "Prompt tokens prefilled (of requests that reached a first token).",
        prompt_tokens,
    )
    out.counter("ringllm_generation_tokens_total", "Tokens generated.", stats.generated_tokens)
    out.gauge("ringllm_requests_waiting", "Engine requests (one per choice) queued for the batch.", stats.waiting)
    out.gauge("ringllm_requests_running", "Engine requests (one per choice) in the running batch.", stats.running)
    out.gauge("ringllm_kv_cache_used_blocks", "KV cache blocks in use.", stats.kv_blocks_used)
    out.gauge("ringllm_kv_cache_total_blocks", "KV cache blocks in the pool.", stats.kv_blocks_total)
    total = stats.kv_blocks_total
    usage = stats.kv_blocks_used / total if total else 0.0
    out.gauge("ringllm_kv_cache_usage_ratio", "KV cache blocks in use, as a fraction of the pool (0 to 1).", usage)
    if (prefix := stats.prefix_cache) is not None:
        out.counter(
            "ringllm_prefix_cache_queries_total",
            "Tokens of admitted sequences looked up in the prefix cache.",
            prefix.lookup_tokens,
        )
        out.counter(
            "ringllm_prefix_cache_hits_total",
            "Of those, tokens whose KV came from the cache (not computed).",
            prefix.hit_tokens,
        )
        out.counter("ringllm_prefix_cache_evicted_blocks_total", "Cached KV blocks evicted.", prefix.evicted_blocks)
        out.gauge("ringllm_prefix_cache_blocks", "KV blocks holding cached prefixes now.", prefix.cached_blocks)
        out.gauge("ringllm_prefix_cache_hit_ratio", "Hit tokens over looked-up tokens since start.", prefix.hit_rate)
    out.histogram(
        "ringllm_time_to_first_token_seconds",
        "Seconds from admission to the end of the step that made a request's first token.",
        ttft,
    )
    out.histogram("ringllm_inter_token_latency_seconds", "Seconds between a request's consecutive tokens.", itl)
    return out.text()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    key = request.app.state.api_key
    if key and not bearer_ok(request.scope["headers"], key):
        raise APIError(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    engine = request.app.state.engine
    tokens = engine.token_metrics
    body = render(
        engine.stats(),
        tokens.prompt_tokens,
        tokens.ttft.snapshot(),
        tokens.itl.snapshot(),
        request.app.state.request_counts.snapshot(),
    )
    return Response(body, media_type=CONTENT_TYPE)
