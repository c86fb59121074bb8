"""GET /metrics: the histogram and the text format (unit tests), request counting by outcome
(an in-process app), and a live server whose counters must move by exactly what the official
`openai` client was served.

Every exposition is read back by `parse`, a strict reader of the text format 0.0.4
(prometheus_client is not a dependency): any line it does not understand fails the test."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from inference.async_engine import EngineStats
from inference.metrics import LATENCY_BUCKETS_S, Histogram, HistogramSnapshot, TokenMetrics
from inference.model_loop import ModelLoop, Pending
from ui.errors import APIError, install_handlers
from ui.metrics import (
    CONTENT_TYPE,
    ENDPOINTS,
    OUTCOMES,
    CountRequests,
    Exposition,
    RequestCounts,
    format_value,
    outcome,
    render,
    stream_failed,
)

from .conftest import wait_for
from .test_api import API_KEY, LONG, MODEL, _launch, _stop, _wait_ready

# -- a strict reader of the text format ---------------------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_HELP = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL}(?:,{_LABEL})*,?)?)\}})? ({_VALUE})(?: -?\d+)?")
_ONE_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')

Series = dict[str, dict[frozenset[tuple[str, str]], float]]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), value)


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """(samples by name then label set, type of each family). Fails on any line that is not
    a HELP, TYPE or sample line as the format defines them, on a sample of no declared family,
    a family declared twice, a series repeated, and a histogram whose buckets do not add up."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    series: Series = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    family: str | None = None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {n}: {line!r}"
        if m := _HELP.fullmatch(line):
            assert m[1] not in helps, f"second HELP for {m[1]}, {where}"
            helps.add(m[1])
            family = m[1]
        elif m := _TYPE.fullmatch(line):
            assert m[1] not in types, f"second TYPE for {m[1]}, {where}"
            assert family == m[1], f"TYPE without its HELP just before, {where}"
            types[m[1]] = m[2]
        elif m := _SAMPLE.fullmatch(line):
            name = m[1]
            assert family is not None and family in types, f"sample before its TYPE, {where}"
            parts = ("_bucket", "_sum", "_count") if types[family] == "histogram" else ("",)
            allowed = {family + part for part in parts}
            assert name in allowed, f"sample outside its family {family}, {where}"
            labels = frozenset((k, _unescape(v)) for k, v in _ONE_LABEL.findall(m[2] or ""))
            assert len(labels) == len(_ONE_LABEL.findall(m[2] or "")), f"a label repeated, {where}"
            rows = series.setdefault(name, {})
            assert labels not in rows, f"series repeated, {where}"
            rows[labels] = float(m[3])
        else:
            pytest.fail(f"not a line of the text format, {where}")
    for name, kind in types.items():
        if kind == "histogram":
            _check_histogram(series, name)
        elif kind == "counter":
            assert all(v >= 0 for v in series.get(name, {}).values()), f"negative counter {name}"
    return series, types


def _check_histogram(series: Series, name: str) -> None:
    buckets = sorted(
        ((float(dict(labels)["le"]), v) for labels, v in series[f"{name}_bucket"].items()), key=lambda b: b[0]
    )
    assert buckets[-1][0] == math.inf, f"{name}: no +Inf bucket"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name}: buckets are not cumulative"
    assert buckets[-1][1] == series[f"{name}_count"][frozenset()], f"{name}: +Inf bucket != count"
    assert frozenset() in series[f"{name}_sum"]


def value(series: Series, name: str, **labels: str) -> float:
    return series[name][frozenset(labels.items())]


# -- Histogram and TokenMetrics ----------------------------------------------------------------------
def test_histogram_buckets_are_inclusive_upper_bounds():
    h = Histogram((0.1, 1.0))
    for v in (0.0, 0.1, 0.10001, 1.0, 1.5, 100.0):
        h.observe(v)
    h.observe(0.05, times=3)
    snap = h.snapshot()
    assert snap.counts == (5, 2, 2)  # <= 0.1 | (0.1, 1] | > 1
    assert snap.cumulative() == [5, 7, 9] and snap.count == 9
    assert snap.sum == pytest.approx(0.1 + 0.10001 + 1.0 + 1.5 + 100.0 + 0.15)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan,)])
def test_histogram_refuses_bad_bounds(bounds):
    with pytest.raises(ValueError):
        Histogram(bounds)


def test_snapshot_needs_one_count_per_bucket_and_one_above():
    with pytest.raises(ValueError):
        HistogramSnapshot((1.0,), (1,), 0.0)


def test_latency_buckets_cover_gpu_to_slow_cpu():
    assert LATENCY_BUCKETS_S[0] <= 0.005 and LATENCY_BUCKETS_S[-1] >= 60
    Histogram(LATENCY_BUCKETS_S)  # valid: finite, increasing


def test_token_metrics_count_one_gap_per_token_after_the_first():
    m = TokenMetrics((0.01, 0.1, 1.0))
    m.first_tokens(0.5, 1, 7)
    m.next_tokens(0.05, 1)
    m.next_tokens(0.06, 3)  # a step that yielded 3 tokens: three gaps of 0.02 s
    ttft, itl = m.ttft.snapshot(), m.itl.snapshot()
    assert ttft.count == 1 and ttft.sum == 0.5 and ttft.counts == (0, 0, 1, 0)
    assert itl.count == 4 and itl.counts == (0, 4, 0, 0) and itl.sum == pytest.approx(0.11)
    assert m.prompt_tokens == 7
    m.first_tokens(0.2, 2, 3)  # a first output of 2 tokens: one gap of 0
    assert m.itl.snapshot().count == 5 and m.ttft.snapshot().count == 2 and m.prompt_tokens == 10


def test_model_loop_measures_from_admission_then_from_the_previous_token():
    metrics = TokenMetrics((0.5, 1.5, 10.0))
    loop = ModelLoop(None, None, 0.0, lambda r: None, None, metrics)  # type: ignore[arg-type]
    req = Pending([1, 2, 3], None, None, None, 0, t_submit=100.0)  # type: ignore[arg-type]
    loop._measure(req, 1, 101.0)
    loop._measure(req, 1, 101.25)
    loop._measure(req, 1, 103.25)
    assert metrics.ttft.snapshot().counts == (0, 1, 0, 0)
    assert metrics.itl.snapshot().counts == (1, 0, 1, 0) and metrics.prompt_tokens == 3


# -- the text format --------------------------------------------------------------------------------
def test_values_are_spelled_as_the_format_wants():
    assert [format_value(v) for v in (3, True, 0.25, 1.0, 1e-7, math.inf, -math.inf)] == [
        "3",
        "1",
        "0.25",
        "1.0",
        "1e-07",
        "+Inf",
        "-Inf",
    ]
    assert format_value(math.nan) == "NaN"


def test_label_values_and_help_are_escaped():
    out = Exposition()
    out.add("x_total", "counter", 'help with \\ and\nnewline and "quotes"', [({"path": 'a\\b"c\nd'}, 1)])
    text = out.text()
    assert text == (
        '# HELP x_total help with \\\\ and\\nnewline and "quotes"\n'
        "# TYPE x_total counter\n"
        'x_total{path="a\\\\b\\"c\\nd"} 1\n'
    )
    series, types = parse(text)
    assert types == {"x_total": "counter"} and value(series, "x_total", path='a\\b"c\nd') == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.gauge("bad-name", "h", 1),
        lambda e: e.add("x", "gauge", "h", [({"bad-label": "v"}, 1)]),
        lambda e: e.add("x", "gauge", "h", [({"__reserved": "v"}, 1)]),
        lambda e: e.add("x", "nonsense", "h", []),
        lambda e: e.add("x", "histogram", "h", []),
        lambda e: (e.gauge("x", "h", 1), e.gauge("x", "h", 2)),
    ],
)
def test_exposition_refuses_what_the_format_cannot_say(call):
    with pytest.raises(ValueError):
        call(Exposition())


def test_histogram_exposition():
    h = Histogram((0.005, 0.5))
    for v in (0.001, 0.2, 0.3, 9.0):
        h.observe(v)
    out = Exposition()
    out.histogram("lat_seconds", "Latency.", h.snapshot())
    lines = out.text().splitlines()
    assert lines[2:] == [
        'lat_seconds_bucket{le="0.005"} 1',
        'lat_seconds_bucket{le="0.5"} 3',
        'lat_seconds_bucket{le="+Inf"} 4',
        "lat_seconds_sum 9.501",
        "lat_seconds_count 4",
    ]
    parse(out.text())


def _stats(**kw) -> EngineStats:
    base = dict(
        model="m",
        waiting=2,
        running=3,
        kv_blocks_used=5,
        kv_blocks_free=15,
        kv_blocks_total=20,
        aborted=0,
        finished=4,
        generated_tokens=40,
        max_model_len=2048,
        ready=True,
    )
    return EngineStats(**{**base, **kw})  # type: ignore[arg-type]


def test_render_is_a_valid_exposition_with_every_metric():
    m = TokenMetrics()
    m.first_tokens(0.3, 1, 11)
    m.next_tokens(0.02, 1)
    counts = RequestCounts()
    counts.add("/v1/completions", "rejected")
    series, types = parse(render(_stats(), m.prompt_tokens, m.ttft.snapshot(), m.itl.snapshot(), counts.snapshot()))
    assert types == {
        "ringllm_requests_total": "counter",
        "ringllm_prompt_tokens_total": "counter",
        "ringllm_generation_tokens_total": "counter",
        "ringllm_requests_waiting": "gauge",
        "ringllm_requests_running": "gauge",
        "ringllm_kv_cache_used_blocks": "gauge",
        "ringllm_kv_cache_total_blocks": "gauge",
        "ringllm_kv_cache_usage_ratio": "gauge",
        "ringllm_time_to_first_token_seconds": "histogram",
        "ringllm_inter_token_latency_seconds": "histogram",
    }
    # Every endpoint x outcome is there from the start, at 0 until it happens.
    assert len(series["ringllm_requests_total"]) == len(ENDPOINTS) * len(OUTCOMES)
    assert value(series, "ringllm_requests_total", endpoint="/v1/completions", outcome="rejected") == 1
    assert value(series, "ringllm_requests_total", endpoint="/v1/responses", outcome="ok") == 0
    assert value(series, "ringllm_prompt_tokens_total") == 11
    assert value(series, "ringllm_generation_tokens_total") == 40
    assert value(series, "ringllm_requests_waiting") == 2 and value(series, "ringllm_requests_running") == 3
    assert value(series, "ringllm_kv_cache_usage_ratio") == 0.25
    assert value(series, "ringllm_time_to_first_token_seconds_count") == 1
    assert value(series, "ringllm_inter_token_latency_seconds_bucket", le="0.02") == 1


def test_render_while_the_model_loads():
    m = TokenMetrics()
    empty = _stats(waiting=0, running=0, kv_blocks_used=0, kv_blocks_free=0, kv_blocks_total=0, generated_tokens=0)
    series, _ = parse(render(empty, 0, m.ttft.snapshot(), m.itl.snapshot(), RequestCounts().snapshot()))
    assert value(series, "ringllm_kv_cache_usage_ratio") == 0


# -- requests by outcome (in process) ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "gone", "failed", "expected"),
    [
        (200, False, False, "ok"),
        (200, False, True, "error"),
        (200, True, False, "aborted"),
        (499, False, False, "aborted"),
        (429, False, False, "rejected"),
        (400, False, False, "error"),
        (401, False, False, "error"),
        (503, False, False, "error"),
        (None, False, False, "error"),
    ],
)
def test_outcome(status, gone, failed, expected):
    assert outcome(status, gone, failed) == expected


def _counting_app() -> tuple[FastAPI, RequestCounts]:
    """An app whose generation routes answer as `?how=` says, behind CountRequests."""
    app = FastAPI()
    install_handlers(app)
    counts = RequestCounts()

    async def answer(request: Request, how: str) -> Response:
        if how == "busy":
            raise APIError(429, "busy", code="queue_full")
        if how == "bad":
            raise APIError(400, "bad")
        if how == "crash":
            raise RuntimeError("boom")
        if how in ("stream", "stream-fails", "endless"):

            async def body() -> AsyncIterator[bytes]:
                yield b"data: 1\n\n"
                if how == "stream-fails":
                    stream_failed(request.scope)
                    yield b"data: error\n\n"
                while how == "endless":
                    await asyncio.sleep(0.01)
                    yield b"data: more\n\n"

            return StreamingResponse(body(), media_type="text/event-stream")
        return JSONResponse({"ok": True})

    for path in ENDPOINTS:
        app.add_api_route(path, answer, methods=["POST", "GET"])
    app.add_api_route("/v1/models", answer, methods=["POST"])
    app.add_middleware(CountRequests, counts=counts)
    return app, counts


def _moved(counts: RequestCounts) -> dict[tuple[str, str], int]:
    return {k: v for k, v in counts.snapshot().items() if v}


def test_each_generation_request_is_counted_once_by_outcome():
    app, counts = _counting_app()

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for how in ("ok", "stream", "busy", "bad", "crash", "stream-fails"):
                await http.post("/v1/chat/completions", params={"how": how})
            await http.post("/v1/completions", params={"how": "ok"})
            await http.get("/v1/completions", params={"how": "ok"})  # not a generation request
            await http.post("/v1/models", params={"how": "ok"})  # not a generation route

    asyncio.run(main())
    chat = "/v1/chat/completions"
    assert _moved(counts) == {
        (chat, "ok"): 2,
        (chat, "rejected"): 1,
        (chat, "error"): 3,
        ("/v1/completions", "ok"): 1,
    }


def test_a_client_that_leaves_mid_stream_is_counted_aborted():
    app, counts = _counting_app()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/responses",
        "raw_path": b"/v1/responses",
        "query_string": b"how=endless",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    streamed: list[bytes] = []

    async def main() -> None:
        some_sent = asyncio.Event()
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await some_sent.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                streamed.append(message["body"])
                if len(streamed) >= 3:
                    some_sent.set()

        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main())
    assert len(streamed) >= 3
    assert _moved(counts) == {("/v1/responses", "aborted"): 1}


# -- a live server ----------------------------------------------------------------------------------
MAX_REQUEST_TOKENS = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    limits = ("--max-request-tokens", str(MAX_REQUEST_TOKENS))
    started = _launch(tmp_path_factory.mktemp("servers"), "metrics", "--api-key", API_KEY, *limits)
    try:
        yield _wait_ready(started)
    finally:
        _stop(started)


def _scrape(server) -> Series:
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    return parse(r.text)[0]


def _requests(series: Series) -> dict[tuple[str, str], float]:
    return {(dict(k)["endpoint"], dict(k)["outcome"]): v for k, v in series["ringllm_requests_total"].items()}


def _delta(before: Series, after: Series) -> dict[tuple[str, str], float]:
    old, new = _requests(before), _requests(after)
    return {k: new[k] - old[k] for k in new if new[k] != old[k]}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.slow
def test_metrics_need_the_api_key_and_name_no_address(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200
    port = server.url.rsplit(":", 1)[1]
    assert "127.0.0.1" not in r.text and port not in r.text


@pytest.mark.slow
def test_counters_move_by_exactly_what_was_served(server, client):
    before = _scrape(server)
    kw = dict(model=MODEL, temperature=0, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": "Name three colors."}],
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
    )
    chat_usage = chunks[-1].usage
    completion = client.completions.create(prompt="The capital of France is", **kw)
    after = _scrape(server)
    usages = [chat_usage, completion.usage]
    assert all(u is not None and u.completion_tokens > 1 for u in usages)

    assert _delta(before, after) == {("/v1/chat/completions", "ok"): 1, ("/v1/completions", "ok"): 1}

    def moved(name: str) -> float:
        return value(after, name) - value(before, name)

    assert moved("ringllm_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert moved("ringllm_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("ringllm_time_to_first_token_seconds_count") == 2
    assert moved("ringllm_time_to_first_token_seconds_sum") > 0
    assert moved("ringllm_inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert moved("ringllm_inter_token_latency_seconds_sum") > 0
    # Both answers ended before the scrape: nothing queued or running.
    assert value(after, "ringllm_requests_waiting") == 0 and value(after, "ringllm_requests_running") == 0
    assert value(after, "ringllm_kv_cache_total_blocks") > 0
    assert 0 <= value(after, "ringllm_kv_cache_usage_ratio") <= 1


@pytest.mark.slow
def test_a_429_is_counted_as_rejected(server, client):
    before = _scrape(server)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=MAX_REQUEST_TOKENS + 1)
    assert err.value.status_code == 429
    assert _delta(before, _scrape(server)) == {("/v1/completions", "rejected"): 1}


@pytest.mark.slow
def test_a_stream_left_early_is_counted_as_aborted(server):
    before = _scrape(server)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {**LONG, "max_tokens": MAX_REQUEST_TOKENS // 2, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: {") for _ in range(4))
        # Leaving the block closes the connection mid-stream.
    wait_for(lambda: _delta(before, _scrape(server)), 30, "the aborted stream to be counted")
    assert _delta(before, _scrape(server)) == {("/v1/completions", "aborted"): 1}


@pytest.mark.parametrize(
    "text",
    [
        "x 1\n",  # no HELP/TYPE
        "# HELP x h\n# TYPE x gauge\nx 1",  # no final newline
        "# HELP x h\n# TYPE x gauge\nx  1\n",  # two spaces
        "# HELP x h\n# TYPE x gauge\n\nx 1\n",  # a blank line
        '# HELP x h\n# TYPE x gauge\nx{a="1"} one\n',  # not a number
        '# HELP x h\n# TYPE x gauge\nx{a="\\t"} 1\n',  # not an escape of the format
        '# HELP x h\n# TYPE x gauge\nx{a="1"} 1\nx{a="1"} 2\n',  # a series twice
        "# HELP x h\n# TYPE x gauge\ny 1\n",  # outside its family
        "# HELP x h\n# TYPE x counter\nx -1\n",  # a counter below 0
        '# HELP h h\n# TYPE h histogram\nh_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
        '# HELP h h\n# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 2\n',
    ],
)
def test_the_reader_is_strict(text):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        parse(text)
