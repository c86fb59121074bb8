"""The OpenAI-compatible API against a live server: `python app.py` in a subprocess on a free
loopback port, driven by the official `openai` client (and httpx for raw bodies).

Two servers per module, started together: one open, one with --api-key and tight admission
limits (a batch of 4, so one request's choices hold at most 2 slots; 4 may wait)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2"
API_KEY = "test-key-0123456789"
# First start converts the GGUF (~40 s, cached afterwards); a loaded machine is slower.
READY_TIMEOUT_S = 240
MESSAGES = [{"role": "user", "content": "Name three colors."}]
# Greedy counting goes on and on (no end-of-turn token), so these requests are still
# running when the client goes away.
LONG = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "temperature": 0}
KEYED_LIMITS = ("--max-batch", "4", "--max-queue", "4", "--max-n", "4", "--max-request-tokens", "3000")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _launch(log_dir: Path, name: str, *extra: str) -> Server:
    port = free_port()
    log = log_dir / f"{name}.log"
    cmd = [
        sys.executable,
        "app.py",
        "--model",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-gb",
        "0.25",
        # Float weights: test_concurrent_streams_match_solo_runs checks that batching never
        # changes a greedy reply. The quantized kernels round activations to bf16, which turns
        # the attention's last-bit differences between batch shapes into visible ones.
        "--quant",
        "none",
        *extra,
    ]
    # OpenMP's default spin-waiting collapses when the 2 cores are shared with other
    # processes (pytest, the second server): decode steps measured 3-6x slower. Passive
    # waiting costs ~10% on an idle machine.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def _wait_ready(server: Server) -> Server:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
            try:
                if http.get(f"{server.url}/healthz").status_code == 200:
                    return server
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
    pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{server.log_tail()}")


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    # Both start at once, so their model loads overlap.
    log_dir = tmp_path_factory.mktemp("servers")
    started = [_launch(log_dir, "open"), _launch(log_dir, "keyed", "--api-key", API_KEY, *KEYED_LIMITS)]
    try:
        yield started
    finally:
        for s in started:
            _stop(s)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return _wait_ready(servers[0])


@pytest.fixture(scope="module")
def keyed_server(servers) -> Server:
    return _wait_ready(servers[1])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from inference.model_source import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(MODEL)))


def _status(server: Server) -> dict:
    return httpx.get(f"{server.url}/api/status", timeout=10).json()


def _chat(client, **kw) -> openai.types.chat.ChatCompletion:
    kw.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=MODEL, **kw)


# -- models, health, status -------------------------------------------------------------------
def test_models_list_and_retrieve(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "ringllm"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    st = _status(server)
    assert st["model"] == MODEL and st["ready"] is True and st["quant"] == "none"  # --quant none
    for key in (
        "waiting",
        "running",
        "kv_blocks_used",
        "kv_blocks_free",
        "kv_blocks_total",
        "aborted",
        "finished",
        "max_model_len",
    ):
        assert isinstance(st[key], int), key


# -- chat ---------------------------------------------------------------------------------------
def test_chat_usage_matches_tokenizer(client, tokenizer):
    from inference.detokenizer import apply_chat_template

    r = _chat(client, temperature=0, max_tokens=4, logprobs=True)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(apply_chat_template(tokenizer, MESSAGES))
    assert r.usage.completion_tokens == 4 == len(choice.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4
    # The generated tokens, re-spelled from their bytes, are the text.
    raw = b"".join(bytes(t.bytes) for t in choice.logprobs.content)
    assert raw.decode() == choice.message.content


def test_a_repeated_prompt_comes_from_the_prefix_cache(client, server):
    messages = [
        {"role": "system", "content": f"Session {uuid.uuid4().hex}. You answer in one word. " * 4},
        {"role": "user", "content": "Name a colour."},
    ]
    first = _chat(client, messages=messages, temperature=0, max_tokens=4)
    again = _chat(client, messages=messages, temperature=0, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a system prompt never seen before
    # Every full 16-token block of the prompt but the one holding its last token (which runs for logits).
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (first.usage.prompt_tokens - 1) // 16 * 16 > 0
    assert again.choices[0].message.content == first.choices[0].message.content
    prefix = _status(server)["prefix_cache"]
    assert prefix["hit_tokens"] >= cached and 0 < prefix["hit_rate"] <= 1 and prefix["cached_blocks"] > 0
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    hits = re.search(r"^ringllm_prefix_cache_hits_total (\d+)", metrics, re.M)
    assert hits and int(hits.group(1)) >= cached


def test_chat_stream_equals_whole(client):
    whole = _chat(client, temperature=0, max_tokens=5)
    chunks = list(_chat(client, temperature=0, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_raw_sse(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}


def test_content_parts_and_roles(client, tokenizer):
    from inference.detokenizer import apply_chat_template

    parts = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    r = _chat(client, messages=parts, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    # Text parts are joined with newlines before templating.
    flat = [{**m, "content": "Hi\nthere"} if isinstance(m["content"], list) else m for m in parts]
    assert r.usage.prompt_tokens == len(apply_chat_template(tokenizer, flat))


def test_max_tokens_gives_length(client):
    r = _chat(client, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_ignore_eos_runs_to_max_tokens(client):
    """vLLM's extension, for benchmarks that need fixed output lengths."""
    short = _chat(client, temperature=0, max_tokens=200)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens + 4
    r = _chat(client, temperature=0, max_tokens=n, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
    assert r.choices[0].message.content.startswith(short.choices[0].message.content)


def test_stop_string(client):
    def complete(**kw):
        return client.completions.create(model=MODEL, prompt=LONG["prompt"], max_tokens=12, temperature=0, **kw)

    full = complete().choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    r = complete(stop=[stop, "unlikely-stop-xyz"])
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert stop not in text and text == full[: full.index(stop)]


def test_seed_reproducible(client):
    def sample(seed):
        return _chat(client, temperature=1.0, max_tokens=6, seed=seed).choices[0].message.content

    a, b, c = sample(1234), sample(1234), sample(4321)
    assert a == b
    assert a != c


def test_n_choices_use_consecutive_seeds(client):
    r = _chat(client, temperature=1.0, max_tokens=4, n=2, seed=77)
    assert [c.index for c in r.choices] == [0, 1]
    single = _chat(client, temperature=1.0, max_tokens=4, seed=78)
    assert r.choices[1].message.content == single.choices[0].message.content
    assert 2 <= r.usage.completion_tokens <= 8


def test_logprobs_shape(client):
    r = _chat(client, temperature=0, max_tokens=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for t in content:
        assert isinstance(t.token, str) and t.logprob <= 0 and isinstance(t.bytes, list)
        assert len(t.top_logprobs) == 3
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    c = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(len(d) == 2 for d in lp.top_logprobs)
    assert "".join(lp.tokens) == c.choices[0].text


# -- completions ----------------------------------------------------------------------------------
def test_completions_string_and_list(client, tokenizer):
    prompts = ["The capital of France is", "Once upon a time"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in prompts]
    for p, s in zip(prompts, singles):
        assert s.object == "text_completion"
        assert s.usage.prompt_tokens == len(tokenizer.encode(p))
        assert s.usage.completion_tokens == 4 and s.choices[0].finish_reason == "length"
    both = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [s.choices[0].text for s in singles]
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert both.usage.completion_tokens == 8
    stream = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == singles[0].choices[0].text
    assert chunks[-1].usage.completion_tokens == 4


# -- concurrency and disconnects ------------------------------------------------------------------
def test_concurrent_streams_match_solo_runs(server):
    prompts = [f"{i} plus {i} is" for i in range(16)]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def stream_one(p: str) -> str:
        s = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in s if c.choices])

    async def run_all() -> list[str]:
        try:
            return await asyncio.gather(*(stream_one(p) for p in prompts))
        finally:
            await aclient.close()

    together = asyncio.run(run_all())
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text for p in prompts
    ]
    assert together == alone
    assert all(together)


def _wait_idle(server: Server, timeout: float = 60) -> dict:
    """The server's status once nothing runs and every KV block is free (the time-out only
    stops a hang: a request that was not aborted would still be decoding its 2000 tokens)."""
    last: dict = {}

    def idle() -> dict | None:
        last.update(st := _status(server))
        return st if st["running"] == 0 and st["waiting"] == 0 and st["kv_blocks_used"] == 0 else None

    try:
        return wait_for(idle, timeout, "the engine to go idle and free its blocks", interval=0.05)
    except AssertionError as e:
        pytest.fail(f"{e}; last status: {last}")


def test_stream_disconnect_frees_blocks(server):
    before = _wait_idle(server)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            # Hold the iterator: dropping it would close the response (an early disconnect).
            lines = r.iter_lines()
            events = [line for line in (next(lines) for _ in range(6)) if line]
            assert len(events) == 3 and all(e.startswith("data: {") for e in events)
            st = _status(server)
            assert st["running"] == 1 and st["kv_blocks_used"] > 0
        # Leaving the block closes the connection mid-stream.
    after = _wait_idle(server)
    assert after["aborted"] == before["aborted"] + 1


def test_nonstream_disconnect_aborts(server):
    before = _wait_idle(server)
    body = json.dumps(LONG).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )
        # A non-streaming answer comes only at the end: hang up once the engine runs the request.
        wait_for(lambda: _status(server)["running"] == 1, 60, "the request to start running")
    after = _wait_idle(server)
    assert after["aborted"] == before["aborted"] + 1


# -- errors ----------------------------------------------------------------------------------------
def _msgs(**kw) -> dict:
    return {"model": MODEL, "messages": MESSAGES, **kw}


ERROR_CASES = [
    # (id, path, raw body or JSON, status, param, code)
    ("malformed-json", "chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    ("not-an-object", "chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("wrong-type", "chat/completions", _msgs(temperature="hot"), 400, "temperature", None),
    ("wrong-type-int", "chat/completions", _msgs(max_tokens=2.5), 400, "max_tokens", None),
    ("missing-messages", "chat/completions", {"model": MODEL}, 400, "messages", None),
    ("empty-messages", "chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "unknown-role",
        "chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
        None,
    ),
    (
        "image-part",
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        400,
        "messages[0].content",
        None,
    ),
    ("unknown-model", "chat/completions", _msgs(model="gpt-4"), 404, "model", "model_not_found"),
    ("too-long", "chat/completions", _msgs(max_tokens=10**6), 400, "max_tokens", None),
    ("negative-temperature", "chat/completions", _msgs(temperature=-1), 400, "temperature", None),
    ("five-stops", "chat/completions", _msgs(stop=list("abcde")), 400, "stop", None),
    (
        "tool-parameters",
        "chat/completions",
        _msgs(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
            tool_choice="required",
        ),
        400,
        "tools[0].function.parameters",
        "invalid_value",
    ),
    ("functions", "chat/completions", _msgs(functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter"),
    (
        "response-format",
        "chat/completions",
        _msgs(response_format={"type": "xml"}),
        400,
        "response_format.type",
        None,
    ),
    ("logit-bias", "chat/completions", _msgs(logit_bias={"1": 5}), 400, "logit_bias", "unsupported_parameter"),
    ("unknown-field", "chat/completions", _msgs(frobnicate=1), 400, "frobnicate", "unsupported_parameter"),
    ("top-logprobs-alone", "chat/completions", _msgs(top_logprobs=2), 400, "top_logprobs", None),
    ("echo-type", "completions", {"prompt": "x", "echo": 1}, 400, "echo", None),
    ("best-of", "completions", {"prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("suffix", "completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ("prompt-type", "completions", {"prompt": 5}, 400, "prompt", None),
    ("prompt-too-long", "completions", {"prompt": "hello " * 7000, "max_tokens": 1}, 400, "prompt", None),
    # Lone UTF-16 surrogates (json.dumps writes them as \ud800 escapes): a 400 naming the field.
    ("surrogate-prompt", "completions", {"prompt": "\ud800"}, 400, "prompt", "invalid_value"),
    ("surrogate-model", "completions", {"model": "\udc00", "prompt": "x"}, 400, "model", "invalid_value"),
    (
        "surrogate-part-type",
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "\ud800", "text": "x"}]}]},
        400,
        "messages[0].content[0].type",
        "invalid_value",
    ),
    (
        "surrogate-content",
        "chat/completions",
        _msgs(messages=[{"role": "user", "content": "a\udfff"}]),
        400,
        "messages[0].content",
        "invalid_value",
    ),
]


@pytest.mark.parametrize("path,body,status,param,code", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_shapes(server, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_oversized_body(server):
    big = json.dumps(_msgs(messages=[{"role": "user", "content": "a" * (1 << 20)}])).encode()
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, content=big, timeout=30)  # Content-Length: refused before reading
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + (64 << 10)]

    r = httpx.post(url, content=chunks(), timeout=30)  # chunked: refused while reading
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_wrong_method_and_unknown_path_get_openai_errors(server, client):
    for method, path, status, code in (
        ("GET", "chat/completions", 405, "method_not_allowed"),
        ("GET", "completions", 405, "method_not_allowed"),
        ("POST", "models", 405, "method_not_allowed"),
        ("GET", "embeddings", 404, "unknown_url"),
        ("POST", "assistants/x/runs", 404, "unknown_url"),
    ):
        r = httpx.request(method, f"{server.url}/v1/{path}", timeout=10)
        assert r.status_code == status, (method, path, r.text)
        assert r.json()["error"]["code"] == code  # not Gradio's {"detail": "Not Found"}
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model=MODEL, input="x")
    assert e.value.body["code"] == "unknown_url"
    assert _chat(client, temperature=0, max_tokens=1).usage.completion_tokens == 1  # still serving


def test_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"


# -- API key -------------------------------------------------------------------------------------
def test_api_key(keyed_server):
    url = f"{keyed_server.url}/v1"
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{url}/models", headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == [MODEL]
    r = good.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2
    assert httpx.get(f"{keyed_server.url}/healthz", timeout=10).status_code == 200


def test_no_api_key_needed_when_off(server):
    r = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert r.status_code == 200 and r.json()["object"] == "list"


# -- admission control (the keyed server: batch 4, 2 slots a request, 4 may wait) ---------------------
def _keyed_async(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


BIG = dict(model=MODEL, messages=MESSAGES, n=4, max_tokens=400, temperature=0, extra_body={"ignore_eos": True})


def test_a_later_chat_starts_while_a_big_n_request_runs(keyed_server):
    """The issue's case: n copies with ignore_eos used to take every batch slot, and a later
    short chat got nothing until they ended. Now the chat completes while all 4 choices of the
    big request are still unfinished."""

    async def main():
        aclient = _keyed_async(keyed_server)
        finished: list[int] = []
        started = asyncio.Event()

        async def consume(stream) -> None:
            async for chunk in stream:
                started.set()
                finished.extend(c.index for c in chunk.choices if c.finish_reason)

        try:
            big = await aclient.chat.completions.create(stream=True, **BIG)
            task = asyncio.create_task(consume(big))
            await asyncio.wait_for(started.wait(), 120)
            chat = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
            done_when_chat_ended = list(finished)
            running = _status(keyed_server)["running"]
            task.cancel()
            await big.close()
            return chat, done_when_chat_ended, running
        finally:
            await aclient.close()

    chat, done, running = asyncio.run(main())
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    assert done == []  # none of the big request's 400-token choices had ended
    assert running == 2  # and two of them were decoding (the other two wait for their slots)
    _wait_idle(keyed_server)


def test_a_full_queue_answers_429_with_retry_after(keyed_server):
    async def main():
        aclient = _keyed_async(keyed_server)
        streams = []
        try:
            # 8 choices in flight: 4 hold the batch, 4 wait, which is the limit.
            for _ in range(2):
                streams.append(await aclient.chat.completions.create(stream=True, **BIG))
            with pytest.raises(openai.RateLimitError) as e:
                await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            raw = httpx.post(
                f"{keyed_server.url}/v1/completions",
                json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            )
            return e.value, raw
        finally:
            for s in streams:
                await s.close()
            await aclient.close()

    err, raw = asyncio.run(main())
    assert err.status_code == 429 and err.body["code"] == "queue_full" and err.body["type"] == "rate_limit_error"
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    assert raw.status_code == 429 and raw.json()["error"]["code"] == "queue_full" and "retry-after" in raw.headers
    _wait_idle(keyed_server)  # the closed streams were aborted: room again
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens <= 2


def test_per_request_limits_answer_429_that_says_do_not_retry(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=2, timeout=60)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=5, max_tokens=2)
    assert e.value.body["code"] == "request_too_large" and e.value.body["param"] == "n"
    assert e.value.response.headers["x-should-retry"] == "false"  # the client gave up at once
    with pytest.raises(openai.RateLimitError) as e:  # 4 x (prompt + 1000) tokens > 3000
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, max_tokens=1000)
    assert e.value.body["param"] == "max_tokens" and "3000" in e.value.body["message"]
    with pytest.raises(openai.RateLimitError):  # prompts x n count on /v1/completions
        client.completions.create(model=MODEL, prompt=["a", "b", "c"], n=2, max_tokens=1)


def test_status_maps_the_cluster_only_for_the_key(keyed_server):
    anon = httpx.get(f"{keyed_server.url}/api/status", timeout=10).json()
    full = httpx.get(
        f"{keyed_server.url}/api/status", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    assert (
        anon["ready"] is True and anon["model"] == MODEL and anon["nodes"][0]["node_id"] == full["nodes"][0]["node_id"]
    )
    assert all("address" not in n for n in anon["nodes"]) and "ring" not in json.dumps(anon)
    assert full["nodes"][0]["address"] and "ring" in full["cluster"]
