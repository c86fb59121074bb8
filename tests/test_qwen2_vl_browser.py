"""The chat page with pictures, in headless Debian Chromium driven by Playwright: the real
app (API + Gradio page) serving the tiny Qwen2-VL in this process on a free loopback port.
A picture attached to the chat box shows as a thumbnail in the history, the reply streams in,
and the Nodes tab says where the vision tower runs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from .conftest import free_port, wait_for
from .test_ui import CHROMIUM, CHROMIUM_ARGS, DESKTOP, wait_reply_done
from .tiny_vl import make_tiny_vl, png_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from cluster.registry import NodeRegistry
    from inference.async_engine import AsyncEngine
    from inference.config import EngineConfig
    from inference.engine import Engine
    from ui.server import build_app
    from ui.web import mount_ui

    path = tmp_path_factory.mktemp("qwen2vl-web")
    make_tiny_vl(path)
    engine = AsyncEngine(Engine(EngineConfig(model=str(path), block_size=4), num_blocks=128), "tiny-vl")
    app = mount_ui(build_app(engine), engine, NodeRegistry())
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn-vl", daemon=True)
    thread.start()
    wait_for(lambda: srv.started, 30, "the server to start", interval=0.1)
    try:
        yield f"http://127.0.0.1:{port}", path
    finally:
        srv.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser tests")
    base, _ = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport=DESKTOP)
        pg.set_default_timeout(30_000)
        pg.goto(base + "/")
        pg.wait_for_selector("#chat-banner .banner-ok")
        yield pg
        browser.close()


def test_uploaded_pictures_show_as_thumbnails_and_get_a_reply(page, tmp_path: Path):
    pictures = []
    for i, (w, h) in enumerate([(56, 84), (90, 60)]):
        pictures.append(tmp_path / f"picture{i}.png")
        pictures[-1].write_bytes(png_bytes(w, h, i))
    page.set_input_files("#chat-input input[type=file]", [str(p) for p in pictures])
    # Both attachments appear in the box before sending (uploads finish first).
    page.wait_for_function("() => document.querySelectorAll('#chat-input img').length >= 2")
    page.fill("#chat-input textarea", "What do you see?")
    page.click("#send-btn")
    reply = wait_reply_done(page, 1)
    assert reply and "⚠️" not in reply
    # The history keeps the pictures as thumbnails above the user's text.
    user = page.locator("#chatbot [data-testid='user']")
    page.wait_for_function(
        "() => document.querySelectorAll(\"#chatbot [data-testid='user'] img\").length >= 2", timeout=10_000
    )
    assert "What do you see?" in user.last.inner_text()
    assert page.locator("#chat-input img").count() == 0  # the box is empty again


def test_nodes_tab_shows_the_vision_tower(page):
    page.click("#tab-nodes-button")
    page.wait_for_selector("#model-summary .model-card")
    summary = page.inner_text("#model-summary").lower()  # labels are upper-cased by CSS
    assert "vision tower" in summary and "master · " in summary and "kib" in summary
