"""Admission control and the API's edges, without a model: the admission gate, lone
surrogates in request bodies, unknown /v1 routes and methods, what /api/status shows a
caller without the API key, and the brake on login guessing. (The same behaviour against a
live server, with the `openai` client, is in test_api.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from inference.admission import Admission, AdmissionLimits, QueueFull, RequestTooLarge
from inference.async_engine import AsyncEngine
from inference.errors import InvalidParameter
from ui.auth import LoginRateLimit
from ui.server import build_app

NODES = [
    {
        "node_id": "w1",
        "address": "10.0.0.2:50051",
        "backend": "torch",
        "device": "cpu",
        "model": "smollm2",
        "layer_start": 0,
        "layer_end": 30,
        "mem_used_bytes": 1,
        "mem_free_bytes": 2,
        "state": "ready",
        "last_heartbeat": 1.0,
        "rtt_ms": 0.5,
        "tok_s": 3.0,
    }
]
CLUSTER = {"mode": "pipeline", "want_workers": 1, "ring": {"port": 40123, "results": 7}, "plan": {"x": 1}}


def _app(api_key: str | None = None):
    return build_app(
        AsyncEngine(None, "smollm2"), api_key=api_key, status_extra=lambda: {"nodes": NODES, "cluster": CLUSTER}
    )


# -- the gate ------------------------------------------------------------------------------------
def test_limits_validate():
    for bad in (dict(max_queue=-1), dict(max_n=0), dict(max_request_tokens=0), dict(unavailable_wait_s=-1)):
        with pytest.raises(InvalidParameter):
            AdmissionLimits(**bad)
    with pytest.raises(InvalidParameter):
        AdmissionLimits(unavailable_wait_s=float("nan"))
    AdmissionLimits(max_queue=0)  # nothing waits: a full batch refuses at once


def test_queue_bound_counts_choices_beyond_the_batch():
    gate = Admission(AdmissionLimits(max_queue=3))
    gate.admit(4, max_batch=2)  # 2 run, 2 wait
    gate.admit(1, max_batch=2)  # 3 wait
    with pytest.raises(QueueFull) as e:
        gate.admit(1, max_batch=2)
    assert e.value.retry_after >= 1 and "3 requests are queued (limit 3)" in str(e.value)
    assert gate.in_flight == 5
    for _ in range(5):
        gate.release(seconds=30.0)
    assert gate.in_flight == 0
    gate.admit(9, max_batch=2)  # an idle server takes any request within the per-request limits
    with pytest.raises(QueueFull) as e:
        gate.admit(1, max_batch=2)
    assert e.value.retry_after == 60  # 8 waiting, 2 at a time, ~30 s each: capped at a minute


def test_per_request_limits_name_the_field():
    gate = Admission(AdmissionLimits(max_n=2, max_request_tokens=100))
    gate.check([(10, 40), (10, 40)])
    with pytest.raises(RequestTooLarge) as e:
        gate.check([(1, 1)] * 3)
    assert e.value.param == "n" and "at most 2" in str(e.value)
    with pytest.raises(RequestTooLarge) as e:
        gate.check([(10, 41), (10, 40)])
    assert e.value.param == "max_tokens" and "101 tokens" in str(e.value)


# -- HTTP edges ----------------------------------------------------------------------------------
SURROGATE_CASES = [
    # (route, raw JSON with a \ud800-style escape, the param the 400 names)
    ("completions", '{"prompt": "\\ud800"}', "prompt"),
    ("completions", '{"prompt": ["ok", "a\\udfffb"]}', "prompt[1]"),
    ("completions", '{"model": "\\udc00", "prompt": "x"}', "model"),
    (
        "chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "\\ud800"}]}]}',
        "messages[0].content[0].type",
    ),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "messages[0].content"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udc00"]}', "stop[0]"),
    ("chat/completions", '{"messages": [{"role": "user", "\\ud800": 1}]}', "messages[0]"),
]


@pytest.mark.parametrize("route,raw,param", SURROGATE_CASES)
def test_lone_surrogates_are_a_400_naming_the_field(route, raw, param):
    with TestClient(_app()) as client:
        r = client.post(f"/v1/{route}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_value" and "surrogate" in err["message"]


def test_raw_utf8_encoded_surrogate_is_a_400_too():
    with TestClient(_app()) as client:  # CESU-8 bytes, which json.loads decodes to a lone surrogate
        r = client.post("/v1/completions", content=b'{"prompt": "\xed\xa0\x80"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    "method,path,status,allow",
    [
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("GET", "/v1/completions", 405, "POST"),
        ("POST", "/v1/models", 405, "GET"),
        ("DELETE", "/v1/models/smollm2", 405, "GET"),
        ("GET", "/v1/embeddings", 404, None),
        ("POST", "/v1/no/such/thing", 404, None),
        ("GET", "/v1", 404, None),
    ],
)
def test_unknown_routes_and_methods_get_openai_errors(method, path, status, allow):
    from cluster.registry import NodeRegistry
    from ui.web import mount_ui

    engine = AsyncEngine(None, "smollm2")
    app = mount_ui(build_app(engine), engine, NodeRegistry())  # Gradio at / must not answer for /v1
    with TestClient(app) as client:
        r = client.request(method, path)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == ("method_not_allowed" if status == 405 else "unknown_url")
    assert r.headers.get("allow") == allow


def test_status_shows_addresses_only_with_the_api_key():
    with TestClient(_app(api_key="k3y")) as client:
        anon = client.get("/api/status").json()
        full = client.get("/api/status", headers={"Authorization": "Bearer k3y"}).json()
        wrong = client.get("/api/status", headers={"Authorization": "Bearer nope"}).json()
    assert full["nodes"] == NODES and full["cluster"] == CLUSTER
    assert wrong == anon
    assert anon["model"] == "smollm2" and "waiting" in anon and "ready" in anon
    assert anon["nodes"] == [
        {
            k: NODES[0][k]
            for k in ("node_id", "state", "layer_start", "layer_end", "model", "backend", "device", "tok_s")
        }
    ]
    assert anon["cluster"] == {"mode": "pipeline", "want_workers": 1}
    assert "10.0.0.2" not in json.dumps(anon) and "40123" not in json.dumps(anon)
    with TestClient(_app()) as client:  # no key set: everything is public, as before
        assert client.get("/api/status").json()["cluster"] == CLUSTER


# -- login brake --------------------------------------------------------------------------------
def test_login_rate_limit_per_address_and_window():
    now = [0.0]
    calls: list[str] = []

    async def form(scope, receive, send):  # stands in for Gradio: "ok" is the password
        body = (await receive())["body"]
        calls.append(scope["client"][0])
        status = 200 if body == b"ok" else 400
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = LoginRateLimit(form, max_failures=3, window_s=60, clock=lambda: now[0])

    async def login(address: str, password: bytes, path: str = "/login") -> tuple[int, dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": password, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "client": (address, 1234), "headers": []}
        await limit(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def main():
        for t in (0, 10, 20):
            now[0] = t
            assert (await login("1.2.3.4", b"nope"))[0] == 400
        now[0] = 30
        status, headers = await login("1.2.3.4", b"ok")  # even the right key: the address is locked
        assert status == 429 and headers[b"retry-after"] == b"30"
        assert (await login("5.6.7.8", b"ok"))[0] == 200  # other addresses are not
        assert (await login("1.2.3.4", b"nope", "/login/"))[0] == 429
        now[0] = 60  # the first failure left the window: one more guess
        assert (await login("1.2.3.4", b"ok"))[0] == 200
        assert (await login("1.2.3.4", b"nope"))[0] == 400
        assert (await login("1.2.3.4", b"ok"))[0] == 429
        now[0] = 200
        assert (await login("1.2.3.4", b"ok"))[0] == 200

    asyncio.run(main())
    assert calls.count("1.2.3.4") == 6  # locked-out attempts never reached the form
