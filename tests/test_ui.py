"""The web UI in a real browser: headless Debian Chromium driven by Playwright, against the
real app (default model) started in a subprocess on a free loopback port.

The browser tests share one page (one Gradio session) and run in file order: streaming,
Stop, a bad request, the system prompt, Regenerate, then the Nodes tab and screenshots
(desktop 1280x800 and phone 390x844, written to artifacts/). Gradio pages keep a connection
open and never reach "networkidle", so every wait is on an element or on /api/status."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
START_TIMEOUT_S = 120  # the model loads in ~5 s when its conversion is cached; CI may be slower
REPLY_TIMEOUT_MS = 90_000  # the 135M model decodes 2-10 tok/s on a busy 2-core machine

BOT = "#chatbot [data-testid='bot'] .message-content"
# The reply text without the figures line under it (tokens, first token, tok/s).
_BOT_TEXTS_JS = """els => els.map(e => { const c = e.cloneNode(true);
    c.querySelectorAll('.msg-meta').forEach(m => m.remove()); return c.innerText.trim(); })"""


# -- fast checks (no browser, no model) ----------------------------------------------------------
def test_chat_says_model_loading_before_the_engine_is_attached():
    from inference.async_engine import AsyncEngine
    from ui.chat import ChatController
    from ui.chat_state import LOADING, ChatState, Exchange

    ctrl = ChatController(AsyncEngine(None, "smollm2"))
    state = ChatState([Exchange("hello")])

    async def run():
        return [out async for out in ctrl.generate(state, "", 0.7, 0.9, 0, 64, -1, 1.0)]

    outs = asyncio.run(run())
    assert LOADING in outs[-1][0][-1]["content"] and not state.busy
    assert "model loading" in ctrl.banner()


def test_api_key_guards_the_ui_with_a_login():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cluster.registry import NodeRegistry
    from inference.async_engine import AsyncEngine
    from ui.web import mount_ui

    app = mount_ui(FastAPI(), AsyncEngine(None, "smollm2"), NodeRegistry(), api_key="s3cret")
    with TestClient(app) as client:
        assert client.get("/config").status_code == 401
        assert client.post("/login", data={"username": "me", "password": "nope"}).status_code == 400
        assert client.post("/login", data={"username": "anyone", "password": "s3cret"}).status_code == 200
        assert client.get("/config").status_code == 200  # the session cookie now opens the page


def test_login_form_refuses_an_address_after_five_wrong_keys():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cluster.registry import NodeRegistry
    from inference.async_engine import AsyncEngine
    from ui.web import mount_ui

    app = mount_ui(FastAPI(), AsyncEngine(None, "smollm2"), NodeRegistry(), api_key="s3cret")
    with TestClient(app) as client:
        for _ in range(5):
            assert client.post("/login", data={"username": "me", "password": "guess"}).status_code == 400
        r = client.post("/login", data={"username": "me", "password": "s3cret"})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "Too many failed logins" in r.json()["detail"]


def test_lone_surrogates_never_break_a_chat_session():
    """A browser can send half of a surrogate pair; the message is refused with a warning, a
    system prompt holding one fails that reply, and the page stays renderable (Gradio sends
    the history as UTF-8 JSON) so the session goes on without Clear."""
    from inference.async_engine import AsyncEngine
    from ui.chat import ChatController
    from ui.chat_state import ChatState, Exchange, render

    ctrl = ChatController(AsyncEngine(None, "smollm2"))
    state = ChatState()
    with pytest.warns(UserWarning, match="surrogate"):
        out = ctrl.take_message("hi \ud83d", state)
    assert out[1] is state and state.exchanges == []

    ctrl = ChatController(SimpleNamespace(accepting=True))  # past the loading check, no model needed
    state = ChatState([Exchange("hello")])

    async def run():
        return [o async for o in ctrl.generate(state, "be \udc00 brief", 0.7, 0.9, 0, 64, -1, 1.0)]

    asyncio.run(run())
    assert "system prompt" in state.exchanges[0].error and "surrogate" in state.exchanges[0].error
    json.dumps(render(state), ensure_ascii=False).encode("utf-8")  # what Gradio must send back
    assert ctrl.take_message("hi again", state)[0] == ""  # the session goes on


def test_empty_registry_explains_itself():
    from cluster.registry import NodeRegistry
    from inference.async_engine import AsyncEngine
    from ui.status import StatusView

    summary, frame, empty = StatusView(AsyncEngine(None, "smollm2"), NodeRegistry(), None).render()
    assert frame.empty and "No nodes yet" in empty and "cluster.worker" in empty
    assert "loading" in summary


def test_parameters_start_at_the_models_generation_config(tmp_path):
    from inference.engine import read_generation_config
    from ui.chat_state import GenDefaults, model_defaults

    assert read_generation_config(tmp_path) == {} and model_defaults({}) == GenDefaults()  # none: ours
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 64})
    )
    d = model_defaults(read_generation_config(tmp_path))
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens, d.seed) == (0.6, 0.95, 20, 1.1, 64, -1)
    assert model_defaults({"do_sample": False, "temperature": 0.6}).temperature == 0.0  # HF's greedy flag wins
    (tmp_path / "generation_config.json").write_text("{not json")
    assert read_generation_config(tmp_path) == {}  # unreadable: a warning, and our defaults


def test_node_table_rows():
    from cluster.registry import NodeInfo, NodeState
    from ui.status import nodes_frame

    w = NodeInfo(
        "w1",
        "10.0.0.2:50051",
        "torch",
        "cuda:0",
        "smollm2",
        15,
        30,
        3 * 2**30,
        5 * 2**30,
        NodeState.LOST,
        last_heartbeat=100.0,
        rtt_ms=2.345,
        tok_s=None,
    )
    row = nodes_frame([w], now=112.5, total_layers={"smollm2": 30}).iloc[0].to_dict()
    assert row["layers"] == "15-30 of 30" and row["backend / device"] == "torch / cuda:0"
    assert row["memory used / free"] == "3.0 GiB / 5.0 GiB" and "lost" in row["state"]
    assert row["heartbeat"] == "12.5 s ago" and row["RTT"] == "2.3 ms" and row["tok/s"] == "—"


# -- the real app in a browser --------------------------------------------------------------------
def _status(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/status", timeout=5) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server():
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(ARTIFACTS / "ui_server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), "--kv-cache-gb", "0.25"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}; see artifacts/ui_server.log")
            try:
                if _status(base)["ready"]:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready after {START_TIMEOUT_S} s; see artifacts/ui_server.log")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_an_idle_server_leaves_the_cpu_alone(server):
    """Nothing polls fast while nobody asks for anything: Gradio's queue, at its default 1 ms,
    alone kept ~5% of a core busy (and the GIL away from the model thread) for ever."""
    import psutil

    port = server.rsplit(":", 1)[1]
    (p,) = [p for p in psutil.process_iter(["cmdline"]) if "app.py" in (c := p.info["cmdline"] or []) and port in c]
    wait_for(lambda: _status(server)["running"] == 0, what="an idle server")
    before = sum(p.cpu_times()[:2])
    t0 = time.monotonic()
    time.sleep(3)  # measuring idleness itself: there is no event to wait on
    used = sum(p.cpu_times()[:2]) - before
    assert used / (time.monotonic() - t0) < 0.025, f"an idle server used {used:.2f} s of CPU in 3 s"


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run the browser tests"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser tests")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport=DESKTOP)
        pg.requested = []  # every URL the page asked for: all must stay on loopback
        pg.on("request", lambda r: pg.requested.append(r.url))
        pg.set_default_timeout(30_000)
        pg.goto(server + "/")
        # The banner turns green once the model is ready and the parameters hold its defaults.
        pg.wait_for_selector("#chat-banner .banner-ok")
        yield pg
        browser.close()


def bot_texts(page) -> list[str]:
    return page.eval_on_selector_all(BOT, _BOT_TEXTS_JS)


def set_param(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    assert box.input_value() == str(value)


def send(page, text: str) -> None:
    page.fill("#chat-input textarea", text)
    page.click("#send-btn")


def wait_reply_done(page, n: int) -> str:
    """Wait until the n-th reply (1-based) shows its figures line; returns its text."""
    page.wait_for_function(
        """n => { const m = document.querySelectorAll("#chatbot [data-testid='bot'] .message-content");
                  return m.length >= n && !!m[n - 1].querySelector('.msg-meta'); }""",
        arg=n,
        timeout=REPLY_TIMEOUT_MS,
    )
    return bot_texts(page)[n - 1]


def page_width(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


def settle(page, width: int) -> None:
    """Wait for the page to be laid out at a new viewport `width`: the window has its size,
    then two frames pass (resize observers and the re-render they trigger run before each)."""
    page.wait_for_function("w => window.innerWidth === w", arg=width)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def screenshots(page, name: str) -> None:
    """artifacts/{name}-desktop.png and {name}-phone.png (full page), then back to desktop."""
    page.screenshot(path=str(ARTIFACTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    settle(page, PHONE["width"])
    # Components that size themselves from their data (the nodes table) follow on a later
    # render: wait for the page to fit, then check it still does once the screenshot is taken.
    widths: list[int] = []

    def fits() -> bool:
        widths.append(page_width(page))
        return widths[-1] <= PHONE["width"]

    try:
        wait_for(fits, 30, f"the {name} page to fit a phone's width", interval=0.1)
    except AssertionError:
        pytest.fail(f"the {name} page is {widths[-1]}px wide on a phone: it scrolls sideways")
    page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    width = page_width(page)
    assert width <= PHONE["width"], f"the {name} page is {width}px wide on a phone: it scrolls sideways"
    page.set_viewport_size(DESKTOP)
    settle(page, DESKTOP["width"])


def clear_chat(page) -> None:
    page.click("#clear-btn")
    page.wait_for_function("() => !document.querySelector(\"#chatbot [data-testid='bot']\")")


@pytest.mark.slow
def test_reply_streams_in(page):
    set_param(page, "temperature", 0)
    set_param(page, "max-tokens", 24)
    finished = _status_of(page)["finished"]
    send(page, "Write a short poem about the sea.")
    seen: list[str] = []  # each distinct text the reply showed while streaming

    def finished_yet() -> bool:
        texts = bot_texts(page)
        if texts and texts[0] not in ("", "…") and (not seen or seen[-1] != texts[0]):
            seen.append(texts[0])
        return _status_of(page)["finished"] != finished

    wait_for(finished_yet, REPLY_TIMEOUT_MS / 1000, "the reply to finish", interval=0.05)
    final = wait_reply_done(page, 1)
    assert len(seen) >= 3, f"expected the reply to grow in several steps, saw {seen!r}"
    assert len(seen[0]) < len(final)
    meta = page.inner_text(f"{BOT} .msg-meta")
    assert re.search(r"\d+ tokens · first token [\d.]+ s · [\d.]+ tok/s", meta), meta


def _status_of(page) -> dict:
    return _status(page.url.rstrip("/"))


@pytest.mark.slow
def test_stop_aborts_the_generation_on_the_server(page):
    clear_chat(page)
    before = _status_of(page)
    set_param(page, "max-tokens", 2000)
    send(page, "Write a long story about a dragon.")
    # Stop once the reply has a few words: mid-generation, far from 2000 tokens.
    page.wait_for_function(
        f'() => {{ const m = document.querySelector("{BOT}"); return m && m.innerText.split(/\\s+/).length > 6; }}',
        timeout=REPLY_TIMEOUT_MS,
    )
    assert _status_of(page)["running"] == 1
    page.click("#stop-btn")

    def engine_idle() -> dict | None:
        st = _status_of(page)
        return None if st["running"] or st["waiting"] else st

    # Without Stop the request would decode for minutes; the time-out only guards a hang.
    st = wait_for(engine_idle, 60, "the engine to drop the request after Stop", interval=0.2)
    assert st["aborted"] == before["aborted"] + 1  # aborted, not finished: its KV blocks are freed
    assert st["kv_blocks_used"] == 0
    # The figures line appears only once the chat's generation has unwound: the final render.
    page.wait_for_selector(f"{BOT} .msg-meta:has-text('stopped')", timeout=30_000)
    text = bot_texts(page)[0]
    # Nothing can add to the reply now: the engine dropped the request and has generated
    # nothing since, and the reply still reads the same, figures line included.
    assert _status_of(page)["generated_tokens"] == st["generated_tokens"], "the engine kept generating after Stop"
    assert bot_texts(page)[0] == text, "the reply kept growing after Stop"
    assert "stopped" in page.inner_text(f"{BOT} .msg-meta")
    assert st["generated_tokens"] - before["generated_tokens"] < 2000


@pytest.mark.slow
def test_a_failed_request_shows_its_error_in_the_chat(page):
    clear_chat(page)
    # Longer than the model's whole context (8192 positions), not only than this server's KV
    # pool: with int4 weights the pool is bf16 and 0.25 GiB holds ~11,000 tokens.
    send(page, "word " * 9000)
    page.wait_for_selector(f"{BOT}:has-text('⚠️')", timeout=30_000)
    assert "context" in bot_texts(page)[0]


@pytest.mark.slow
def test_system_prompt_makes_the_reply_french(page):
    clear_chat(page)
    # The 135M model follows this pair reliably at temperature 0 (without the system prompt
    # it answers "The capital of Germany is Berlin."; with "Always answer in French." alone it
    # drifts into German or Dutch for this question).
    page.fill("#system-prompt textarea", "You are a French assistant. Always answer in French.")
    set_param(page, "temperature", 0)
    set_param(page, "max-tokens", 40)
    send(page, "What is the capital of Germany?")
    reply = wait_reply_done(page, 1)
    words = set(re.findall(r"\w+", reply.lower()))
    french = words & {
        "est",
        "la",
        "le",
        "les",
        "de",
        "du",
        "bonjour",
        "capitale",
        "allemagne",
        "monsieur",
        "une",
        "et",
        "je",
        "république",
    }
    assert len(french) >= 2 and "the capital of germany is" not in reply.lower(), reply
    screenshots(page, "chat")


@pytest.mark.slow
def test_regenerate_replaces_the_last_reply(page):
    if not bot_texts(page):  # run alone: make a reply to regenerate
        set_param(page, "max-tokens", 40)
        send(page, "What is the capital of Germany?")
        wait_reply_done(page, 1)
    old = bot_texts(page)
    finished = _status_of(page)["finished"]
    set_param(page, "temperature", 1.0)
    set_param(page, "max-tokens", 16)
    page.fill("#seed input", "-1")
    page.click("#regen-btn")
    seen = set()

    def finished_yet() -> bool:
        seen.update(bot_texts(page)[-1:])
        return _status_of(page)["finished"] != finished

    wait_for(finished_yet, REPLY_TIMEOUT_MS / 1000, "the regenerated reply to finish", interval=0.05)
    new = wait_reply_done(page, len(old))
    assert len(bot_texts(page)) == len(old)  # replaced, not appended
    seen.add(new)
    assert seen - {old[-1]}, "the last reply was not re-streamed"
    assert new != old[-1]  # temperature 1 with a random seed: another answer
    # The same history again: its KV came from the prefix cache, and the reply says so.
    meta = page.locator(f"{BOT} .msg-meta").last.inner_text()
    assert re.search(r"· \d+ tokens from cache", meta), meta


@pytest.mark.slow
def test_nodes_tab_shows_the_master_and_screenshots(page):
    page.click("#tab-nodes-button")
    page.wait_for_function("() => /ready/.test(document.querySelector('#nodes-table')?.innerText || '')")
    text = page.inner_text("#nodes-table")
    assert "master" in text and "0-30" in text and "torch / cpu" in text and "smollm2" in text
    summary = page.inner_text("#model-summary").upper()
    assert "KV BLOCKS USED / FREE" in summary and "QUEUED" in summary and "RUNNING" in summary
    assert re.search(r"\d+% HIT · \S+ TOKENS REUSED · \S+ CACHED · \d+ EVICTED", summary), summary
    screenshots(page, "nodes")
    page.click("#tab-chat-button")
    # Offline by construction: nothing but this server was ever requested (no CDN, fonts, analytics).
    foreign = [u for u in page.requested if not u.startswith(page.url.rstrip("/")) and not u.startswith("data:")]
    assert not foreign, foreign
