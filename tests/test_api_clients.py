"""What real clients send beyond plain chat, against a live server driven by the official
`openai` client (and httpx for raw bodies): the Responses API, prompt scoring on
/v1/completions (echo, logprobs, max_tokens 0, token-id prompts: what lm-evaluation-harness
sends), GET /health, stream_options.continuous_usage_stats, CORS, and harmless fields.

One server for the module, with an API key and one allowed browser origin."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import openai
import pytest

from .test_api import API_KEY, MODEL, ROOT, _launch, _stop, _wait_ready

pytestmark = pytest.mark.slow

ORIGIN = "http://app.example"
PROMPT = "The capital of France is Paris. The capital of Italy is"
TOL = 1e-3  # the server's float32 logprobs against transformers' on the same weights


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = _launch(tmp_path_factory.mktemp("servers"), "clients", "--api-key", API_KEY, "--allowed-origins", ORIGIN)
    try:
        yield _wait_ready(started)
    finally:
        _stop(started)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """transformers on the weights the server runs (the GGUF's float32 conversion), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.model_source import resolve_model

    path = str(resolve_model(MODEL))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _prompt_logprobs(model, ids: list[int], k: int):
    """transformers' logprob of each token after the first, and the top k of each position."""
    import torch

    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
    return chosen, logp.topk(k, dim=-1).values.tolist()


# -- the Responses API ---------------------------------------------------------------------------
def test_responses_stream_events_and_text_equal_the_whole_response(client):
    kw = dict(model=MODEL, input="Name three colors.", temperature=0, max_output_tokens=64)
    whole = client.responses.create(**kw)
    assert whole.object == "response" and whole.status == "completed" and whole.output_text
    assert whole.output[0].type == "message" and whole.output[0].content[0].type == "output_text"
    u = whole.usage
    assert u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens

    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[:4] == head and kinds[-4:] == [*tail, "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events[4:-4]) == whole.output_text == events[-4].text
    assert events[-1].response.usage.output_tokens == u.output_tokens

    # The SDK's stream helper accumulates the same events into a parsed response.
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text


def test_responses_instructions_messages_and_continuation(client):
    plain = client.responses.create(model=MODEL, input="Say hello.", temperature=0, max_output_tokens=24)
    told = client.responses.create(
        model=MODEL, input="Say hello.", instructions="Answer in French.", temperature=0, max_output_tokens=24
    )
    # Instructions are a system message in front of the input: the same chat as this one.
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=24,
    )
    assert told.instructions == "Answer in French." and told.output_text == chat.choices[0].message.content
    assert told.usage.input_tokens == chat.usage.prompt_tokens != plain.usage.input_tokens
    # A message list (developer = system, text parts) is the same chat as instructions + input.
    as_list = client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
        ],
        temperature=0,
        max_output_tokens=24,
    )
    assert as_list.output_text == told.output_text and as_list.usage.input_tokens == told.usage.input_tokens

    # A continuation replays the stored conversation, output included.
    more = client.responses.create(
        model=MODEL, input="Now in German.", previous_response_id=plain.id, temperature=0, max_output_tokens=24
    )
    replay = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": [{"type": "output_text", "text": plain.output_text, "annotations": []}]},
            {"role": "user", "content": "Now in German."},
        ],
        temperature=0,
        max_output_tokens=24,
    )
    assert more.previous_response_id == plain.id
    assert more.output_text == replay.output_text and more.usage.input_tokens == replay.usage.input_tokens

    assert client.responses.retrieve(plain.id).output_text == plain.output_text
    client.responses.delete(plain.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(plain.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=plain.id)
    assert e.value.body["param"] == "previous_response_id"
    unkept = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", previous_response_id=unkept.id)


def test_responses_incomplete_and_refusals(client):
    r = client.responses.create(model=MODEL, input="Count to fifty.", temperature=0, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    kinds = [e.type for e in client.responses.create(model=MODEL, input="Count.", max_output_tokens=2, stream=True)]
    assert kinds[-1] == "response.incomplete"
    for bad, param in (
        (dict(tools=[{"type": "web_search"}]), "tools[0].type"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(reasoning={"effort": "high"}), "reasoning"),
        (dict(input=[{"type": "reasoning", "summary": []}]), "input[0]"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]), None),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": MODEL, "input": "x", **bad})
        assert param is None or e.value.body["param"] == param, e.value.body


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ASK = "What is the weather in Paris?"


def test_responses_function_calls(client):
    kw = dict(model=MODEL, tools=[WEATHER], temperature=0, max_output_tokens=60)
    r = client.responses.create(input=ASK, tool_choice="required", **kw)
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    assert call.call_id and call.id and r.tools[0].name == "get_weather"

    # Streamed: the call's item, its arguments in deltas, then done; the SDK parses them.
    events = list(
        client.responses.create(input=ASK, tool_choice={"type": "function", "name": "get_weather"}, stream=True, **kw)
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == events[-3].arguments == call.arguments
    with client.responses.stream(input=ASK, tool_choice="required", **kw) as stream:
        final = stream.get_final_response()
    assert final.output[0].parsed_arguments == json.loads(call.arguments)

    # The result goes back by reference to the stored response, or with the whole history:
    # the same chat either way.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}
    kw["tool_choice"] = "none"
    stored = client.responses.create(previous_response_id=r.id, input=[result], **kw)
    history = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True), result]
    replay = client.responses.create(input=history, **kw)
    assert stored.output_text == replay.output_text
    assert stored.status == "completed" and stored.usage.input_tokens == replay.usage.input_tokens


def test_responses_json_schema_output(client):
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string"}},
        "required": ["color"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input="Name a color, as JSON.",
        text={"format": {"type": "json_schema", "name": "color", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=60,
    )
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"color"}


# -- prompt scoring on /v1/completions -------------------------------------------------------------
def test_echo_max_tokens_0_scores_the_prompt_like_transformers(client, reference):
    model, tok = reference
    ids = tok.encode(PROMPT)
    want, top = _prompt_logprobs(model, ids, 2)
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids] and len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=TOL)
    got_top = [v for d in lp.top_logprobs[1:] for v in sorted(d.values(), reverse=True)]
    assert got_top == pytest.approx([v for row in top for v in row], abs=TOL)


def test_token_id_prompts_as_lm_eval_sends_them(client, reference):
    """lm-eval's loglikelihood payload: token-id prompts, echo, logprobs 1, max_tokens 1, greedy."""
    model, tok = reference
    batch = [tok.encode(PROMPT), tok.encode("One, two, three, four")]
    r = client.completions.create(
        model=MODEL, prompt=batch, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c, ids in zip(r.choices, batch):
        want, top = _prompt_logprobs(model, ids, 1)
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + 1  # the prompt, then the one generated token
        assert c.text == tok.decode(ids) + lp.tokens[-1]
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=TOL)
        # lm-eval's is_greedy test: a token is greedy when its logprob is its position's best.
        greedy = [t == max(d.values()) for t, d in zip(lp.token_logprobs[1:-1], lp.top_logprobs[1:-1])]
        assert greedy == [abs(w - t[0]) < 1e-6 for w, t in zip(want, top)]
    assert r.usage.prompt_tokens == sum(map(len, batch)) and r.usage.completion_tokens == 2
    # The same ids without echo: only the continuation comes back.
    plain = client.completions.create(model=MODEL, prompt=batch[0], max_tokens=1, temperature=0)
    assert plain.choices[0].text == r.choices[0].logprobs.tokens[-1]


def test_echo_stream_and_errors(client, server):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=3, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    head = {"Authorization": f"Bearer {API_KEY}"}
    for body, param in (
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt[1]"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=head, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# -- health, usage, CORS, harmless fields ----------------------------------------------------------
def test_health_needs_no_key(server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200 and r.content == b""


def test_continuous_usage_stats(client):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options=opts,
        )
    )
    assert all(c.usage is not None for c in chat)
    used = [c.usage.completion_tokens for c in chat if c.choices and c.choices[0].delta.content]
    assert used == sorted(used) and used[-1] == 4 == chat[-1].usage.completion_tokens
    assert len({c.usage.prompt_tokens for c in chat}) == 1
    plain = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True, stream_options=opts))
    assert all(c.usage is not None for c in plain) and plain[-1].usage.completion_tokens == 3


def test_cors(server):
    url = f"{server.url}/v1/chat/completions"
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(url, headers=pre, timeout=10)  # a preflight carries no key
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in r.headers
    assert httpx.options(url, headers={**pre, "Origin": "http://other.example"}, timeout=10).status_code == 400

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = httpx.post(url, json=body, headers={"Origin": ORIGIN}, timeout=30)  # the request itself needs the key
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    ok = httpx.post(url, json=body, headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.post(
        url, json=body, headers={"Origin": "http://other.example", "Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/", headers={"Origin": ORIGIN}).headers


def test_harmless_fields_are_accepted(client):
    def reply(messages, **kw):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, **kw)
        return r.choices[0].message.content, r.usage.prompt_tokens

    system = reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    developer = reply(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "bob"}],
        store=False,
    )
    assert developer == system


def test_lm_eval_harness_scores_through_the_server(server, tmp_path):
    """The real harness, when one is installed (it is no dependency of the project: point
    RINGLLM_LM_EVAL at the `lm_eval` of an environment with lm-eval[api]). bench/lmeval/compare.py
    also runs lm-eval's transformers backend and compares every loglikelihood."""
    from inference.model_source import resolve_model

    lm_eval = os.environ.get("RINGLLM_LM_EVAL")
    if not lm_eval:
        pytest.skip("set RINGLLM_LM_EVAL to an lm_eval executable to run lm-evaluation-harness")
    args = f"base_url={server.url}/v1/completions,model={MODEL},tokenizer_backend=huggingface,"
    args += f"tokenizer={resolve_model(MODEL)},max_retries=1"
    cmd = [lm_eval, "--model", "local-completions", "--model_args", args, "--tasks", "ringllm_tiny_mc"]
    cmd += ["--include_path", "bench/lmeval", "--output_path", str(tmp_path)]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    (results,) = tmp_path.glob("**/results_*.json")
    metrics = json.loads(results.read_text())["results"]["ringllm_tiny_mc"]
    assert metrics["acc,none"] >= 0.5  # 20 easy questions; transformers gets 0.8 on these weights
