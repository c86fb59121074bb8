"""The web UI: one Gradio Blocks page (Chat and Nodes tabs) mounted at `/` of the API app.

`mount_ui` is the only entry point; `--no-ui` is simply not calling it. Everything the
page needs (CSS, logo, fonts, JS) is served by this process: no CDN, no analytics, no
Google Fonts, so the page works on an offline machine.

API key: when `api_key` is set the page sits behind Gradio's own login (`auth=`): a
login form whose *password* must be the API key; any username is accepted. Failed logins
are rate-limited per client address (`ui.auth.LoginRateLimit`)."""

from __future__ import annotations

import hmac
import html
import logging
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from cluster.local_node import MasterNode
from cluster.registry import NodeRegistry
from inference.async_engine import AsyncEngine

from .auth import LoginRateLimit
from .chat import ChatController, build_chat_tab
from .status import StatusView, build_status_tab, stop_timer

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TITLE = "ringllm"


def theme() -> gr.themes.Base:
    # System font stacks only: a GoogleFont here would make every page load call fonts.googleapis.com.
    return gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="slate",
        neutral_hue="slate",
        radius_size="md",
        font=["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


def header_html(model_name: str) -> str:
    logo = (ASSETS / "logo.svg").read_text()  # inline: no extra request, styled by style.css
    return (
        f'<header class="app-header">{logo}<div><h1>{TITLE}</h1>'
        f"<p>chat with <b>{html.escape(model_name)}</b>, split across your machines · "
        f"OpenAI API at <code>/v1</code></p></div></header>"
    )


def build_blocks(engine: AsyncEngine, registry: NodeRegistry, master: MasterNode | None) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False, fill_width=False) as demo:
        gr.HTML(header_html(engine.model_name), js_on_load=None)
        with gr.Tabs(elem_id="main-tabs"):
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                build_chat_tab(ChatController(engine))
            with gr.Tab("Nodes", id="nodes", elem_id="tab-nodes") as nodes_tab:
                timer = build_status_tab(StatusView(engine, registry, master), nodes_tab)
        chat_tab.select(stop_timer, outputs=timer, queue=False)
    return demo


def _key_auth(api_key: str):
    def check(username: str, password: str) -> bool:  # any username; constant-time compare
        return hmac.compare_digest(password.encode(), api_key.encode())

    return check


def mount_ui(
    app: FastAPI,
    engine: AsyncEngine,
    registry: NodeRegistry,
    api_key: str | None = None,
    address: str | None = None,
    master: MasterNode | None = None,
) -> FastAPI:
    """Mount the Chat + Nodes page at `/` of `app` and return the app.

    `registry` feeds the Nodes tab; the master's own row is refreshed into it while the tab
    is open (`address` is the URL shown in that row; the master passes its own row, `master`,
    which /api/status refreshes too). With
    `api_key`, the page needs a login: password = the key, at most 5 wrong guesses a minute
    from one address."""
    master = master or MasterNode(engine, address or "this server")
    master.refresh(registry)  # the master is listed from the first snapshot on
    demo = build_blocks(engine, registry, master)
    auth = _key_auth(api_key) if api_key else None
    if api_key:
        app.add_middleware(LoginRateLimit)
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        auth_message="Enter this server's API key as the password (any username).",
        theme=theme(),
        css_paths=[ASSETS / "style.css"],
        favicon_path=str(ASSETS / "logo.svg"),
        footer_links=[],
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        show_error=True,
    )
    slow_queue_polling(demo)
    return app


# How often Gradio's queue looks for new events while it has none, and for progress to send
# (seconds). Its defaults elsewhere than Windows, 1 and 10 ms, wake the event loop ~1,100
# times a second for ever: ~5% of a core on an idle server, and under load a wake-up that
# takes the GIL from the model thread a thousand times a second. These are Gradio's own
# values on Windows; a page's event starts at most 50 ms later.
QUEUE_POLL_S = 0.05
PROGRESS_POLL_S = 0.1


def slow_queue_polling(demo: gr.Blocks) -> None:
    queue = getattr(demo, "_queue", None)
    if queue is None or not hasattr(queue, "sleep_when_free"):  # another Gradio: leave it as it is
        log.warning("Gradio's queue has no sleep_when_free: its idle polling is left at its default")
        return
    queue.sleep_when_free = QUEUE_POLL_S
    queue.progress_update_sleep_when_free = PROGRESS_POLL_S
