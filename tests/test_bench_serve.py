"""bench/serve.py against a tiny in-process fake of the OpenAI streaming API (stdlib only),
plus one slow end-to-end run with --start-server on the real app."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = serve  # dataclasses look their module up there
_spec.loader.exec_module(serve)


class FakeHandler(BaseHTTPRequestHandler):
    """One chunk every `delay` s carrying `per_chunk` tokens, after a role-only chunk and a
    `ttft` s pause; a request whose prompt contains `fail_tag` answers 500."""

    delay, ttft, per_chunk, fail_tag = 0.02, 0.05, 1, None
    bodies: list[dict] = []  # every request body received, shared by the tests

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def send_json(self, obj: dict, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_json(
                {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "t"}]}
            )
        elif self.path in ("/healthz", "/api/status"):
            self.send_json({"ready": True})
        else:
            self.send_json({"error": {"message": "no such route", "type": "invalid_request_error"}}, 404)

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(req)
        prompt = req["messages"][0]["content"]
        if self.fail_tag and self.fail_tag in prompt:
            self.send_json({"error": {"message": "injected", "type": "server_error"}}, 500)
            return
        n, ptoks = req["max_tokens"], len(prompt.split()) + 7
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes

        def send(obj: dict) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        send({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        time.sleep(self.ttft)
        sent = 0
        while sent < n:
            k = min(self.per_chunk, n - sent)
            sent += k
            send({"choices": [{"index": 0, "delta": {"content": " x" * k}, "finish_reason": None}]})
            if sent < n:
                time.sleep(self.delay)
        send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        send({"choices": [], "usage": {"prompt_tokens": ptoks, "completion_tokens": n, "total_tokens": ptoks + n}})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake():
    """Start a fake with the given handler attributes; yields a factory returning its /v1 URL."""
    servers = []

    def start(**attrs) -> str:
        handler = type("Handler", (FakeHandler,), attrs)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def run_bench(url: str, out: Path, *extra: str) -> dict:
    rc = serve.main(
        [
            "--url",
            url,
            "--out",
            str(out),
            "--concurrency",
            "1",
            "4",
            "--requests-per-level",
            "8",
            "--max-tokens",
            "16",
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_itl_ttft_and_scaling(fake, tmp_path, capsys):
    res = run_bench(fake(delay=0.02, ttft=0.05), tmp_path / "r.json")
    c1, c4 = res["levels"]
    assert res["meta"]["model"] == "fake"
    for lv in (c1, c4):
        assert lv["ok"] == 8 and lv["failed"] == 0 and lv["completion_tokens"] == 8 * 16 and lv["tokens_from_usage"]
        assert 18 <= lv["itl_ms"]["p50"] <= 40  # 20 ms a token, slack for a loaded machine
        assert 45 <= lv["ttft_ms"]["p50"] <= 150  # the role-only chunk must not count as a token
        assert len(lv["per_request"][0]["gaps_ms"]) == 15
    assert c4["speedup"] > 2.5  # streams are independent: 4 in flight is ~4x the tokens/s
    assert 150 <= res["meta"]["prompt_tokens"]["min"] <= 250  # sized to ~200 by the probes
    assert 45 <= res["ttft_alone_ms"] <= 150
    out = capsys.readouterr().out
    assert "agg tok/s" in out and "TTFT alone" in out


def test_rounds_take_each_speedup_against_their_own_c1(fake, tmp_path, capsys):
    url = fake(delay=0.01, ttft=0.01)
    FakeHandler.bodies.clear()
    res = run_bench(url, tmp_path / "r.json", "--rounds", "2")
    prompts = [b["messages"][0]["content"] for b in FakeHandler.bodies if b.get("max_tokens", 0) > 1]
    assert len(prompts) == len(set(prompts))  # no round repeats a prompt a server could have cached
    assert [(lv["round"], lv["concurrency"]) for lv in res["levels"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    c1, c4 = res["medians"]
    assert (c1["concurrency"], c1["rounds"], c1["speedup"]) == (1, 2, 1.0)
    assert c4["speedups"] == [res["levels"][1]["speedup"], res["levels"][3]["speedup"]]
    assert c4["speedup"] > 2.5 and c4["agg_tok_s"] > c1["agg_tok_s"]
    assert "medians of 2 rounds" in capsys.readouterr().out


def test_ignore_eos_is_asked_for_unless_turned_off(fake, tmp_path):
    url = fake()
    FakeHandler.bodies.clear()
    run_bench(url, tmp_path / "a.json")
    assert FakeHandler.bodies and all(b.get("ignore_eos") is True for b in FakeHandler.bodies)
    FakeHandler.bodies.clear()
    run_bench(url, tmp_path / "b.json", "--no-ignore-eos")
    assert FakeHandler.bodies and all("ignore_eos" not in b for b in FakeHandler.bodies)


def test_multi_token_chunks_divide_the_gap(fake, tmp_path):
    res = run_bench(fake(delay=0.04, ttft=0.01, per_chunk=4), tmp_path / "r.json", "--concurrency", "2")
    (lv,) = res["levels"]
    assert lv["completion_tokens"] == 8 * 16
    # 4 chunks 40 ms apart carry 16 tokens: ITL = 3 * 40 / 15 = 8 ms, raw gaps stay 40 ms
    assert 7 <= lv["itl_ms"]["p50"] <= 15
    assert 38 <= lv["chunk_gap_ms"]["p50"] <= 70


def test_failed_requests_are_counted_not_fatal(fake, tmp_path):
    res = run_bench(fake(delay=0.001, ttft=0.001, fail_tag="[c4-3]"), tmp_path / "r.json")
    c1, c4 = res["levels"]
    assert c1["failed"] == 0
    assert c4["failed"] == 1 and c4["ok"] == 7 and c4["errors"] == ["HTTP 500: injected"]


def test_unreachable_server_is_one_line_and_nonzero(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "bench/serve.py",
            "--url",
            f"http://127.0.0.1:{free_port()}/v1",
            "--out",
            str(tmp_path / "r.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.startswith("error: cannot reach the server") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr and not (tmp_path / "r.json").exists()


def test_help_covers_every_flag():
    p = subprocess.run(
        [sys.executable, "bench/serve.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0
    for flag in (
        "--url",
        "--api-key",
        "--model",
        "--concurrency",
        "--rounds",
        "--requests-per-level",
        "--max-tokens",
        "--prompt-tokens",
        "--temperature",
        "--timeout",
        "--max-seconds",
        "--out",
        "--start-server",
        "--server-args",
        "--server-timeout",
        "--llama-cpp",
    ):
        assert flag in p.stdout


def test_the_llama_cpp_baseline_needs_the_default_model_on_a_started_server():
    for argv in (["--llama-cpp", "3"], ["--start-server", "--server-args", "--model x", "--llama-cpp", "3"]):
        with pytest.raises(SystemExit):
            serve.parse_args(argv)
    assert serve.parse_args(["--start-server", "--llama-cpp", "3"]).llama_cpp == 3


@pytest.mark.slow
def test_start_server_runs_and_stops_the_real_app(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run(
        [
            sys.executable,
            "bench/serve.py",
            "--start-server",
            "--server-args",
            "--kv-cache-gb 0.25",
            "--concurrency",
            "1",
            "2",
            "--requests-per-level",
            "2",
            "--max-tokens",
            "4",
            "--prompt-tokens",
            "50",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert [lv["ok"] for lv in res["levels"]] == [2, 2]
    port = int(re.search(r"--port (\d+)", p.stderr).group(1))
    with pytest.raises(ConnectionRefusedError):  # the server is gone: nothing listens there
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
