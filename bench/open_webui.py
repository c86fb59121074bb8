"""Open WebUI (the self-hosted chat front end) chatting through this server, in Chromium.

    python3.11 -m venv /tmp/owui && /tmp/owui/bin/pip install open-webui   # once, ~7 GB
    .venv/bin/python bench/open_webui.py [--owui /tmp/owui/bin/open-webui] [--server-args "..."]

Open WebUI is not a dependency of the project: it lives in its own venv (it pins its own
torch, fastapi, ...), and this script only runs its `open-webui serve` command.

Starts, each on a free loopback port:
  1. this server: `app.py --no-ui --api-key K` (default model) plus --server-args;
  2. a small logging proxy in front of it, which records every request Open WebUI sends to
     /v1 (method, path, status, latency, the JSON body, the error body of any 4xx/5xx, and
     the streamed reply put back together);
  3. Open WebUI (`open-webui serve`), offline (OFFLINE_MODE, no Ollama, no local embedding
     model, WEBUI_AUTH=false, DATA_DIR in a temporary folder), with OPENAI_API_BASE_URL =
     the proxy's /v1 and OPENAI_API_KEY = K.
Then headless Debian Chromium (Playwright) opens Open WebUI, picks the model, sends
"What is the capital of France?", waits for the streamed reply to finish, reads it from the
page, sends a second message in the same chat (so the history goes back to the server),
waits for Open WebUI's background tasks (title, tags, follow-ups: more chat completions), and
takes a screenshot. Prints a table of steps and one of the requests; writes
bench/results/open_webui.json and bench/results/open_webui.png. Exit status 1 when a step
failed or the server answered any request with 4xx/5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CHROMIUM = "/usr/bin/chromium"
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
MESSAGES = ("What is the capital of France?", "And what is the capital of Germany?")
MAX_STR = 600  # longer strings in the recorded bodies are cut (task prompts repeat the chat)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


async def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if await asyncio.to_thread(http_status, url) == 200:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{what} not up after {timeout:.0f} s ({url})")


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group started for proc, SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# -- the logging proxy ----------------------------------------------------------------------------
def _cut(value):
    if isinstance(value, str):
        return value if len(value) <= MAX_STR else value[:MAX_STR] + f"... [{len(value)} chars]"
    if isinstance(value, list):
        return [_cut(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    return value


def _task_of(body: dict) -> str:
    """Open WebUI's background tasks are chat completions whose last user message is a
    '### Task:' prompt; name them from it."""
    msgs = body.get("messages") or []
    last = next((m for m in reversed(msgs) if m.get("role") == "user"), {})
    text = last.get("content") if isinstance(last.get("content"), str) else json.dumps(last.get("content"))
    if "### Task:" not in (text or ""):
        return "chat"
    head = text.lower()[:120]
    for needle, name in (
        ("title", "title"),
        ("tags", "tags"),
        ("follow-up", "follow_ups"),
        ("messages this user might", "follow_ups"),
        ("query", "query"),
        ("emoji", "emoji"),
        ("autocomplete", "autocomplete"),
    ):
        if needle in head:
            return f"task:{name}"
    return "task:other"


def _parse_sse(raw: bytes) -> dict:
    content, finish, usage, chunks, errors, tool_calls = [], None, None, 0, [], 0
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            errors.append(data[:300])
            continue
        chunks += 1
        if "error" in obj:
            errors.append(obj["error"])
        usage = obj.get("usage") or usage
        for ch in obj.get("choices") or []:
            delta = ch.get("delta") or {}
            content.append(delta.get("content") or "")
            tool_calls += len(delta.get("tool_calls") or [])
            finish = ch.get("finish_reason") or finish
    return {
        "chunks": chunks,
        "content": "".join(content),
        "finish_reason": finish,
        "usage": usage,
        "tool_call_deltas": tool_calls,
        "errors": errors,
    }


class LoggingProxy:
    """Forwards everything to `upstream` unchanged (streams included) and keeps a record per
    request in self.records."""

    def __init__(self, upstream: str):
        import httpx
        from starlette.applications import Starlette
        from starlette.responses import Response, StreamingResponse
        from starlette.routing import Route

        self.records: list[dict] = []
        self.t0 = time.monotonic()
        client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(None))
        self.client = client
        skip_req = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}
        skip_resp = {"content-length", "transfer-encoding", "connection", "content-encoding"}

        async def handle(request):
            body = await request.body()
            rec: dict = {
                "t_s": round(time.monotonic() - self.t0, 3),
                "method": request.method,
                "path": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
                "auth": "bearer" if request.headers.get("authorization", "").lower().startswith("bearer ") else None,
                "done": False,
            }
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = body[:MAX_STR].decode("utf-8", "replace")
            if parsed is not None:
                rec["body"] = _cut(parsed)
                if isinstance(parsed, dict):
                    rec["fields"] = sorted(parsed)
                    if "messages" in parsed:
                        rec["kind"] = _task_of(parsed)
            self.records.append(rec)
            start = time.monotonic()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in skip_req}
            try:
                resp = await client.send(
                    client.build_request(request.method, rec["path"], content=body, headers=headers), stream=True
                )
            except httpx.HTTPError as e:
                rec.update(status=502, error=repr(e), done=True, latency_s=round(time.monotonic() - start, 3))
                return Response(status_code=502)
            rec["status"] = resp.status_code
            rec["content_type"] = resp.headers.get("content-type", "")
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in skip_resp}

            async def relay():
                raw = bytearray()
                first = None
                try:
                    async for piece in resp.aiter_raw():
                        if first is None:
                            first = time.monotonic()
                        raw.extend(piece)
                        yield piece
                finally:
                    await resp.aclose()
                    rec["latency_s"] = round(time.monotonic() - start, 3)
                    if first is not None:
                        rec["first_byte_s"] = round(first - start, 3)
                    if "text/event-stream" in rec["content_type"]:
                        rec["stream"] = _parse_sse(bytes(raw))
                    else:
                        try:
                            obj = json.loads(raw) if raw else None
                        except ValueError:
                            obj = bytes(raw[:2000]).decode("utf-8", "replace")
                        if resp.status_code >= 400:
                            rec["error_body"] = obj
                        elif isinstance(obj, dict) and obj.get("choices"):
                            msg = obj["choices"][0].get("message") or {}
                            rec["reply"] = _cut(msg.get("content"))
                            rec["finish_reason"] = obj["choices"][0].get("finish_reason")
                        elif isinstance(obj, dict) and "data" in obj:
                            rec["models"] = [m.get("id") for m in obj["data"] if isinstance(m, dict)]
                    rec["done"] = True

            return StreamingResponse(relay(), status_code=resp.status_code, headers=out_headers)

        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
        self.app = Starlette(routes=[Route("/{path:path}", handle, methods=methods)])

    def busy(self) -> bool:
        return any(not r["done"] for r in self.records)


# -- the browser ----------------------------------------------------------------------------------
LAST_REPLY_JS = """() => {
  const all = document.querySelectorAll('.chat-assistant');
  if (!all.length) return null;
  const el = all[all.length - 1];
  const c = el.querySelector('#response-content-container') || el;
  return c.innerText.trim();
}"""


async def send_and_wait(page, proxy: LoggingProxy, text: str, timeout_s: float) -> dict:
    """Types `text` into the chat box, presses Enter and waits until the server's stream has
    ended and the reply on the page has stopped changing."""
    n_before = await page.locator(".chat-assistant").count()
    n_records = len(proxy.records)
    box = page.locator("#chat-input")
    await box.click()
    await page.keyboard.type(text)
    t0 = time.monotonic()
    await page.keyboard.press("Enter")
    out: dict = {"message": text}
    await page.locator(".chat-assistant").nth(n_before).wait_for(timeout=30_000)
    first_text = None
    last, stable_since = None, time.monotonic()
    chat_rec = None
    while time.monotonic() - t0 < timeout_s:
        reply = await page.evaluate(LAST_REPLY_JS)
        now = time.monotonic()
        if reply and first_text is None:
            first_text = now - t0
        if reply != last:
            last, stable_since = reply, now
        if chat_rec is None:
            chat_rec = next(
                (r for r in proxy.records[n_records:] if r.get("kind") == "chat" and r["path"].startswith("/v1/chat")),
                None,
            )
        if chat_rec is not None and chat_rec["done"] and last and now - stable_since > 2.0:
            break
        await asyncio.sleep(0.2)
    else:
        out["error"] = f"no finished reply after {timeout_s:.0f} s"
    out["reply"] = last
    out["first_text_s"] = None if first_text is None else round(first_text, 2)
    out["done_s"] = round(time.monotonic() - t0, 2)
    if chat_rec is not None:
        body = chat_rec.get("body") if isinstance(chat_rec.get("body"), dict) else {}
        out["request_fields"] = chat_rec.get("fields")
        out["tools_sent"] = len(body.get("tools") or [])
        out["history_sent"] = [m.get("role") for m in body.get("messages") or []]
        out["server_status"] = chat_rec.get("status")
        if chat_rec.get("error_body"):
            out["error_body"] = chat_rec["error_body"]
        out["tool_call_deltas"] = (chat_rec.get("stream") or {}).get("tool_call_deltas")
        out["server_latency_s"] = chat_rec.get("latency_s")
        out["streamed_content"] = (chat_rec.get("stream") or {}).get("content")
        out["finish_reason"] = (chat_rec.get("stream") or {}).get("finish_reason") or chat_rec.get("finish_reason")
        norm = lambda s: " ".join((s or "").split())  # noqa: E731
        out["page_matches_stream"] = bool(last) and norm(out["streamed_content"]) == norm(last)
    else:
        out["error"] = out.get("error") or "Open WebUI sent no chat completion to the server"
    return out


async def drive(args, owui_url: str, proxy: LoggingProxy, steps: list[dict]) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text[:300]) if m.type == "error" else None)
        try:
            t0 = time.monotonic()
            await page.goto(owui_url, wait_until="domcontentloaded")
            await page.wait_for_selector("#chat-input", timeout=60_000)
            await page.wait_for_timeout(1500)  # the "What's New" dialog comes a moment later
            whats_new = page.get_by_role("button", name="Okay, Let's Go!")
            if await whats_new.count():
                await whats_new.click()
            steps.append({"step": "open page", "ok": True, "detail": owui_url, "s": round(time.monotonic() - t0, 2)})

            t0 = time.monotonic()
            await page.click("#model-selector-model-button")
            option = page.locator(f'[role="option"][data-value="{args.model_id}"]')
            offered = await page.locator('[role="option"]').evaluate_all("els => els.map(e => e.dataset.value)")
            await option.click(timeout=10_000)
            label = await page.locator("#model-selector-model-button").get_attribute("aria-label")
            ok = label == f"Selected model: {args.model_id}"
            steps.append(
                {
                    "step": "pick model",
                    "ok": ok,
                    "detail": f"offered {offered}; {label}",
                    "s": round(time.monotonic() - t0, 2),
                }
            )

            for i, text in enumerate(MESSAGES, 1):
                res = await send_and_wait(page, proxy, text, args.reply_timeout)
                ok = not res.get("error") and res.get("server_status") == 200 and bool(res.get("reply"))
                steps.append({"step": f"message {i}", "ok": ok, **res})

            # Open WebUI's background tasks (title, tags, follow-ups) run after a reply.
            t0 = time.monotonic()
            quiet_since = time.monotonic()
            while time.monotonic() - t0 < args.task_timeout:
                if proxy.busy():
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 5:
                    break
                await asyncio.sleep(0.5)
            await page.wait_for_timeout(1000)
            tasks = [r for r in proxy.records if str(r.get("kind", "")).startswith("task:")]
            steps.append(
                {
                    # Slow tasks are no failure (a tiny model on a CPU may ramble to max_tokens);
                    # a refused one is.
                    "step": "background tasks",
                    "ok": all((r.get("status") or 0) < 400 for r in tasks),
                    "detail": ", ".join(
                        f"{r['kind']} {r.get('status')} "
                        + (f"{r.get('latency_s')} s" if r["done"] else "still running")
                        for r in tasks
                    )
                    or "none sent",
                    "s": round(time.monotonic() - t0, 2),
                }
            )
            title = await page.title()
            steps.append({"step": "chat title", "ok": True, "detail": title})
        finally:
            RESULTS.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(Exception):
                await page.screenshot(path=str(args.screenshot))
            steps.append({"step": "console errors", "ok": True, "detail": console_errors[:20]})
            await browser.close()


# -- main -----------------------------------------------------------------------------------------
def print_tables(steps: list[dict], records: list[dict]) -> None:
    print(f"\n{'step':<18} {'ok':<4} {'s':>7}  detail")
    for s in steps:
        secs = s.get("done_s", s.get("s"))
        if "reply" in s:
            detail = (
                f"first text {s.get('first_text_s')} s, server {s.get('server_status')} "
                f"finish={s.get('finish_reason')} tools={s.get('tools_sent')} history={s.get('history_sent')} "
                f"page==stream {s.get('page_matches_stream')}: "
                f"{(s.get('reply') or '')[:120]!r}" + (f"  ERROR {s['error']}" if s.get("error") else "")
            )
        else:
            detail = str(s.get("detail", ""))[:160]
        print(f"{s['step']:<18} {('yes' if s['ok'] else 'NO'):<4} {'' if secs is None else secs:>7}  {detail}")
    print(f"\n{'t s':>7} {'request':<28} {'kind':<16} {'status':>6} {'lat s':>7}  fields")
    for r in records:
        fields = ",".join(f for f in r.get("fields", []) if f != "messages")
        extra = f"  error_body={json.dumps(r['error_body'])[:300]}" if r.get("error_body") else ""
        print(
            f"{r['t_s']:>7} {r['method'] + ' ' + r['path'][:22]:<28} {r.get('kind', ''):<16} "
            f"{r.get('status', '-'):>6} {r.get('latency_s', '-'):>7}  {fields}{extra}"
        )


async def run(args) -> int:
    import uvicorn

    steps: list[dict] = []
    server = owui = None
    proxy_server = proxy_task = None
    data_dir = Path(tempfile.mkdtemp(prefix="owui-bench-"))
    server_log = data_dir / "server.log"
    owui_log = data_dir / "open_webui.log"
    port, proxy_port, owui_port = free_port(), free_port(), free_port()
    key = args.api_key or "bench-" + secrets.token_hex(8)
    proxy = LoggingProxy(f"http://127.0.0.1:{port}")
    versions: dict = {}
    try:
        # 1. this server
        cmd = [
            sys.executable, "app.py", "--no-ui", "--port", str(port), "--api-key", key,
            *shlex.split(args.server_args),
        ]  # fmt: skip
        with open(server_log, "w") as log:
            server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        secs = await wait_http(f"http://127.0.0.1:{port}/health", server, args.start_timeout, "the server")
        steps.append({"step": "start server", "ok": True, "detail": " ".join(cmd[1:]), "s": round(secs, 2)})

        # 2. the logging proxy
        cfg = uvicorn.Config(proxy.app, host="127.0.0.1", port=proxy_port, log_level="critical", lifespan="off")
        proxy_server = uvicorn.Server(cfg)
        proxy_task = asyncio.create_task(proxy_server.serve())
        while not proxy_server.started:
            await asyncio.sleep(0.05)
        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        ) as r:
            models = [m["id"] for m in json.load(r)["data"]]
        args.model_id = args.model_id or models[0]

        # 3. Open WebUI
        env = {
            **os.environ,
            "DATA_DIR": str(data_dir / "data"),
            "OFFLINE_MODE": "true",
            "HF_HUB_OFFLINE": "1",
            "WEBUI_AUTH": "false",
            "WEBUI_SECRET_KEY": secrets.token_hex(16),
            "ENABLE_OLLAMA_API": "false",
            "OPENAI_API_BASE_URL": f"http://127.0.0.1:{proxy_port}/v1",
            "OPENAI_API_KEY": key,
            "RAG_EMBEDDING_ENGINE": "openai",  # no local sentence-transformers model to download
            "ENABLE_VERSION_UPDATE_CHECK": "false",
            "ANONYMIZED_TELEMETRY": "false",
            "DO_NOT_TRACK": "true",
            "SCARF_NO_ANALYTICS": "true",
        }
        env.pop("VIRTUAL_ENV", None)
        owui_cmd = [args.owui, "serve", "--host", "127.0.0.1", "--port", str(owui_port)]
        with open(owui_log, "w") as log:
            owui = subprocess.Popen(
                owui_cmd, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        secs = await wait_http(f"http://127.0.0.1:{owui_port}/api/config", owui, args.start_timeout, "Open WebUI")
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://127.0.0.1:{owui_port}/api/version", timeout=5) as r:
                versions["open_webui"] = json.load(r).get("version")
        steps.append(
            {"step": "start Open WebUI", "ok": True, "detail": f"v{versions.get('open_webui')}", "s": round(secs, 2)}
        )

        # 4. the browser
        await drive(args, f"http://127.0.0.1:{owui_port}/", proxy, steps)
    except Exception as e:  # noqa: BLE001 - a failed step is a result; the report still gets written
        steps.append({"step": "error", "ok": False, "detail": f"{type(e).__name__}: {e}"})
    finally:
        stop(owui)
        if proxy_server is not None:
            proxy_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proxy_task, 10)
        await proxy.client.aclose()
        stop(server)
    for r in proxy.records:
        if not r["done"]:
            r["cut_at_shutdown"] = True  # still streaming when the run ended

    server_lines = [ln for ln in server_log.read_text(errors="replace").splitlines() if "ui.server:" in ln]
    owui_errors = [
        ln for ln in owui_log.read_text(errors="replace").splitlines() if "| ERROR" in ln or "Traceback" in ln
    ]
    bad = [r for r in proxy.records if (r.get("status") or 0) >= 400]
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "open_webui_version": versions.get("open_webui"),
        "model": args.model_id,
        "server_args": args.server_args,
        "ok": all(s["ok"] for s in steps) and not bad,
        "steps": steps,
        "requests": proxy.records,
        "refused_requests": bad,
        "server_log": server_lines,
        "open_webui_errors": owui_errors[:50],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_tables(steps, proxy.records)
    print(f"\nwrote {args.out.relative_to(ROOT)} and {args.screenshot.relative_to(ROOT)}; logs in {data_dir}")
    if not args.keep_data:
        shutil.rmtree(data_dir / "data", ignore_errors=True)
    return 0 if report["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owui", default=os.environ.get("OPEN_WEBUI_BIN", "/tmp/owui/bin/open-webui"),
                    help="the open-webui command of its own venv")  # fmt: skip
    ap.add_argument(
        "--server-args",
        default="",
        help="more arguments for app.py (keep the default KV budget: Open WebUI's 36 built-in tools make a"
        " ~6,600-token prompt, over the context --kv-cache-gb 0.25 leaves)",
    )
    ap.add_argument("--model-id", default=None, help="model to pick in Open WebUI (default: the server's first)")
    ap.add_argument("--api-key", default=None, help="default: a random one")
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--reply-timeout", type=float, default=300.0, help="per message")
    ap.add_argument("--task-timeout", type=float, default=300.0, help="wait for Open WebUI's background tasks")
    ap.add_argument("--out", type=Path, default=RESULTS / "open_webui.json")
    ap.add_argument("--screenshot", type=Path, default=RESULTS / "open_webui.png")
    ap.add_argument("--keep-data", action="store_true", help="keep Open WebUI's DATA_DIR (its database)")
    args = ap.parse_args()
    if not Path(args.owui).exists():
        print(f"no Open WebUI at {args.owui}: python3.11 -m venv /tmp/owui && /tmp/owui/bin/pip install open-webui")
        return 2
    args.out, args.screenshot = args.out.resolve(), args.screenshot.resolve()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
