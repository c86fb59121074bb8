"""Serving throughput and latency of a running server, over its OpenAI-compatible API.

    .venv/bin/python bench/serve.py [--url http://127.0.0.1:7860/v1] [--concurrency 1 4 16 32]
    .venv/bin/python bench/serve.py --start-server [--server-args "--max-batch 32"] [--llama-cpp 5]

For each concurrency level C, sends --requests-per-level streaming chat completions with
exactly C in flight (a pool of C workers), each a ~--prompt-tokens user prompt asking for
--max-tokens new tokens (with ignore_eos, so an early end-of-turn cannot shrink a level's
work). Tokens are counted from the server's usage chunk
(stream_options.include_usage), not from chunks: a chunk may carry several tokens.
  TTFT   = request start -> first chunk with non-empty delta content
  ITL    = (last content chunk - first content chunk) / (completion_tokens - 1), per request;
           the raw gaps between content chunks are kept in the JSON too
  agg tok/s = completion tokens of the level's successful requests / wall time of the level
Before the levels: two 1-token probes size the prompt (and warm the server up), then one
request on the idle server gives "TTFT alone". Prints a table; writes bench/results/serve.json.

--system-prompt-tokens N puts the same ~N-token system message before every request's
distinct user prompt (many users of one assistant): with the server's prefix cache, only the
first request computes it. The usage's prompt_tokens_details.cached_tokens gives the prompt
tokens each level really computed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The lighthouse keeper climbed the spiral stairs at dusk to light the lamp for the ships. "
INSTRUCTION = "Continue this story in your own words, at length:\n\n"
PROBE_REPS = (4, 12)  # sentence repeats of the two sizing probes
LOAD_LEVEL = 16  # "TTFT under load" is this level's TTFT p50


class BenchError(Exception):
    """A fatal condition worth one line on stderr (unreachable server, bad flag, ...)."""


class StreamError(Exception):
    """An error event inside an SSE stream that had already answered 200."""


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    itl_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0  # of the prompt, served from the prefix cache (usage.prompt_tokens_details)
    completion_tokens: int = 0
    tokens_from_usage: bool = False
    finish_reason: str | None = None
    chunks: int = 0  # content chunks
    gaps_s: list[float] = field(default_factory=list)


def pct(xs: list[float], q: float) -> float | None:
    """q-th percentile with linear interpolation (numpy's default); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


def status_line(e) -> str:
    """'HTTP 500: message' from an openai.APIStatusError, without the SDK's 'Error code' prefix."""
    msg = e.message.removeprefix(f"Error code: {e.status_code}").removeprefix(" - ")
    return f"HTTP {e.status_code}" + (f": {msg}" if msg else "")


def system_prompt(reps: int) -> str:
    """The shared system message of --system-prompt-tokens (the same text for every request)."""
    return f"You are the narrator of a long story. It so far: {SENTENCE * reps}" if reps else ""


def make_prompt(reps: int, tag: str) -> str:
    # A distinct tag first, so no two requests share a prefix a server could cache.
    return f"[{tag}] {INSTRUCTION}{SENTENCE * reps}"


async def one_request(client, args, prompt: str, max_tokens: int) -> RequestResult:
    import openai

    r, times, usage = RequestResult(), [], None
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(args.timeout):
            # The SDK sends the request and raises its typed errors; the SSE lines are parsed
            # here: building its pydantic chunk objects costs ~0.5 ms of client CPU a chunk,
            # which caps a one-process client near 2k chunks/s and would skew high levels.
            async with client.chat.completions.with_streaming_response.create(
                model=args.model,
                messages=([{"role": "system", "content": args.system}] if args.system else [])
                + [{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=args.temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True} if args.ignore_eos else None,
            ) as resp:
                async for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    now, data = time.perf_counter(), line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise StreamError(str((chunk["error"] or {}).get("message", chunk["error"])))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            times.append(now)
                        r.finish_reason = choice.get("finish_reason") or r.finish_reason
    except TimeoutError:
        r.error = f"timed out after {args.timeout:g} s"
    except openai.APIStatusError as e:
        r.error = status_line(e)
    except openai.APIConnectionError as e:
        r.error = f"connection error: {e.__cause__ or e}"
    except StreamError as e:
        r.error = f"error event in the stream: {e}"
    except Exception as e:  # a benchmark records a broken stream and goes on
        r.error = f"{type(e).__name__}: {e}"
    r.latency_s = time.perf_counter() - t0
    r.chunks = len(times)
    if r.error is None and not times:
        r.error = "no content in the response"
    if r.error is not None:
        return r
    r.ok = True
    r.ttft_s = times[0] - t0
    r.gaps_s = [b - a for a, b in zip(times, times[1:])]
    if usage is not None:
        r.tokens_from_usage = True
        r.completion_tokens, r.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
        r.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    else:  # no usage chunk: fall back to one token per chunk (an undercount if chunks merge tokens)
        r.completion_tokens = len(times)
    if len(times) >= 2 and r.completion_tokens >= 2:
        r.itl_s = (times[-1] - times[0]) / (r.completion_tokens - 1)
    return r


async def run_level(client, args, reps: int, conc: int, n: int, tag: str = "") -> dict:
    """`tag`: put before each prompt's own tag (rounds after the first: no prompt repeats)."""
    todo = iter(range(n))  # shared by the workers: next() never yields, so no lock is needed
    results: list[RequestResult] = []

    async def worker() -> None:
        for i in todo:
            results.append(await one_request(client, args, make_prompt(reps, f"{tag}c{conc}-{i}"), args.max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(conc, n))))
    return summarize(conc, results, time.perf_counter() - t0)


def summarize(conc: int, results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    itl = [r.itl_s for r in ok if r.itl_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    tokens = sum(r.completion_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return dict(
        concurrency=conc,
        requests=len(results),
        ok=len(ok),
        failed=len(results) - len(ok),
        wall_s=wall,
        completion_tokens=tokens,
        agg_tok_s=tokens / wall if wall > 0 else None,
        req_s=len(ok) / wall,
        ttft_ms={f"p{q}": ms(pct(ttft, q)) for q in (50, 95, 99)} | dict(max=ms(max(ttft, default=None))),
        itl_ms={f"p{q}": ms(pct(itl, q)) for q in (50, 95, 99)},
        chunk_gap_ms={f"p{q}": ms(pct(gaps, q)) for q in (50, 95, 99)} | dict(max=ms(max(gaps, default=None))),
        latency_ms={f"p{q}": ms(pct([r.latency_s for r in ok], q)) for q in (50, 95)},
        prompt_tokens=dict(min=min(prompts, default=None), max=max(prompts, default=None)),
        # Prompt tokens the server computed (not found in its prefix cache), of how many sent.
        prompt_tokens_sent=sum(prompts),
        prompt_tokens_computed=sum(prompts) - sum(r.cached_tokens for r in ok if r.prompt_tokens is not None),
        short_completions=sum(r.finish_reason != "length" for r in ok),
        tokens_from_usage=all(r.tokens_from_usage for r in ok),
        errors=sorted({r.error for r in results if r.error})[:5],
        per_request=[
            dict(
                ok=r.ok,
                error=r.error,
                ttft_ms=ms(r.ttft_s),
                itl_ms=ms(r.itl_s),
                latency_ms=ms(r.latency_s),
                prompt_tokens=r.prompt_tokens,
                cached_tokens=r.cached_tokens,
                completion_tokens=r.completion_tokens,
                finish_reason=r.finish_reason,
                chunks=r.chunks,
                gaps_ms=[round(g * 1000, 3) for g in r.gaps_s],
            )
            for r in results
        ],
    )


async def check_server(client, args) -> None:
    """Reach /v1/models once; pick the model; turn each way of failing into one line."""
    import openai

    try:
        models = [m.id async for m in client.models.list()]
    except openai.AuthenticationError:
        raise BenchError(f"{args.url} rejected the API key (HTTP 401); pass the right --api-key") from None
    except openai.APIStatusError as e:
        hint = " (is --url the API base, ending in /v1?)" if e.status_code == 404 else ""
        raise BenchError(f"GET {args.url}/models answered {status_line(e)}{hint}") from None
    except openai.APIConnectionError as e:
        raise BenchError(f"cannot reach the server at {args.url} ({e.__cause__ or e})") from None
    if args.model is None:
        if not models:
            raise BenchError(f"{args.url}/models lists no model; pass --model")
        args.model = models[0]


async def size_prompt(client, args) -> int:
    """Sentence repeats that make a prompt of about --prompt-tokens, from two 1-token probes."""
    counts = []
    for reps in PROBE_REPS:
        r = await one_request(client, args, make_prompt(reps, "probe"), 1)
        if not r.ok:
            raise BenchError(f"a 1-token probe request failed: {r.error}")
        counts.append(r.prompt_tokens)
    if None in counts or counts[1] <= counts[0]:  # no usage: assume ~1.3 tokens a word
        per, fixed = 1.3 * len(SENTENCE.split()), 1.3 * len(INSTRUCTION.split()) + 10
    else:
        per = (counts[1] - counts[0]) / (PROBE_REPS[1] - PROBE_REPS[0])
        fixed = counts[0] - per * PROBE_REPS[0]
    reps = max(1, round((args.prompt_tokens - fixed) / per))
    if args.system_prompt_tokens:
        args.system = system_prompt(max(1, round(args.system_prompt_tokens / per)))
    return reps


def direct_opener() -> urllib.request.OpenerDirector:
    # No proxies from the environment: the benchmark only ever talks to the URL it was given.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, timeout: float) -> dict | None:
    try:
        with direct_opener().open(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


class ManagedServer:
    """`python app.py --port P` as a child in its own process group; stop() ends the group."""

    def __init__(self, extra: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "app.py", "--port", str(self.port), *extra]
        print(f"starting: {shlex.join(cmd)} (log: {self.log.name})", file=sys.stderr)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout: float) -> None:
        opener = direct_opener()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (rc := self.proc.poll()) is not None:
                lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
                last = lines[-1] if lines else "(no output)"
                raise BenchError(f"server exited with code {rc} before it was healthy: {last} (log: {self.log.name})")
            try:
                with opener.open(self.root + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise BenchError(f"server not healthy after {timeout:g} s (log: {self.log.name})")

    def stop(self, keep_log: bool) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):  # graceful first
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        self.log.close()
        if not keep_log:
            os.unlink(self.log.name)


def level_medians(levels: list[dict]) -> list[dict]:
    """Per concurrency, the medians over rounds: a shared machine's slow minutes hit every
    level of a round alike, so the speedups are taken round by round."""

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    out = []
    for conc in dict.fromkeys(lv["concurrency"] for lv in levels):
        mine = [lv for lv in levels if lv["concurrency"] == conc]
        speedups = [lv["speedup"] for lv in mine if lv["speedup"] is not None]
        out.append(
            dict(
                concurrency=conc,
                rounds=len(mine),
                agg_tok_s=med([lv["agg_tok_s"] for lv in mine if lv["agg_tok_s"] is not None]),
                itl_p50_ms=med([lv["itl_ms"]["p50"] for lv in mine if lv["itl_ms"]["p50"] is not None]),
                speedup=med(speedups),
                speedups=speedups,
            )
        )
    return out


def print_table(levels: list[dict], alone_ms: float | None, load_ms: float | None, prompt: dict) -> None:
    def f(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    print(
        f"{'conc':>5}{'reqs':>6}{'agg tok/s':>11}{'speedup':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
        f"{'ITL p50':>9}{'ITL p95':>9}{'failed':>8}"
    )
    for lv in levels:
        speedup = "-" if lv["speedup"] is None else f"{lv['speedup']:.2f}x"
        print(
            f"{lv['concurrency']:>5}{lv['requests']:>6}{f(lv['agg_tok_s']):>11}{speedup:>9}"
            f"{f(lv['ttft_ms']['p50']):>10}{f(lv['ttft_ms']['p95']):>10}{f(lv['itl_ms']['p50'], '.2f'):>9}"
            f"{f(lv['itl_ms']['p95'], '.2f'):>9}{lv['failed']:>8}"
        )
    if prompt["min"] is None:
        print("(latencies in ms) the server sent no usage: prompt size unknown, tokens counted one per chunk")
    else:
        span = prompt["min"] if prompt["min"] == prompt["max"] else f"{prompt['min']}-{prompt['max']}"
        print(f"(latencies in ms) prompt: {span} tokens by the server's count")
    print(f"TTFT alone (idle server): {f(alone_ms)} ms; under load (C={LOAD_LEVEL} p50): {f(load_ms)} ms")
    if short := sum(lv["short_completions"] for lv in levels):
        print(f"note: {short} responses stopped before --max-tokens (EOS); tok/s counts only real tokens")


async def bench(args, result: dict) -> None:
    import openai

    http = openai.DefaultAsyncHttpxClient(trust_env=False)  # no proxy env: only ever the given URL
    async with openai.AsyncOpenAI(
        base_url=args.url, api_key=args.api_key, max_retries=0, timeout=args.timeout, http_client=http
    ) as client:
        await check_server(client, args)
        status = await asyncio.to_thread(get_json, args.url.removesuffix("/v1") + "/api/status", 5)
        result["meta"].update(model=args.model, server_status=status)
        reps = await size_prompt(client, args)
        alone = await one_request(client, args, make_prompt(reps, "alone"), args.max_tokens)
        if not alone.ok:
            raise BenchError(f"the idle-server request failed: {alone.error}")
        result["ttft_alone_ms"] = ms(alone.ttft_s)
        for rnd in range(1, args.rounds + 1):
            for conc in args.concurrency:
                n = args.requests_per_level or max(8, 2 * conc)
                label = f"round {rnd}, " if args.rounds > 1 else ""
                print(f"{label}C={conc}: {n} requests ...", end="", file=sys.stderr, flush=True)
                lv = await run_level(client, args, reps, conc, n, f"r{rnd}-" if rnd > 1 else "")
                print(f" {lv['wall_s']:.1f} s, {lv['failed']} failed", file=sys.stderr)
                if lv["ok"] == 0 and all(e.startswith("connection error") for e in lv["errors"]):
                    raise BenchError(f"the server stopped answering at C={conc}: {lv['errors'][0]}")
                lv["round"] = rnd
                result["levels"].append(lv)
        if args.llama_cpp:
            print(f"{args.llama_cpp} pairs with llama.cpp ...", file=sys.stderr, flush=True)
            result["llama_cpp"] = await llama_cpp_pairs(client, args, reps)


async def llama_cpp_pairs(client, args, reps: int) -> dict | None:
    """`args.llama_cpp` pairs of one C=1 request to the idle server, then llama.cpp on the
    default model's GGUF in this process on the same prompt (token ids by the model's own
    chat template) for as many tokens: ratios within a pair cancel the machine's drift."""
    import statistics

    sys.path.insert(0, str(ROOT))
    from bench import llama_cpp_baseline
    from inference.detokenizer import apply_chat_template
    from inference.engine import load_tokenizer
    from inference.model_source import resolve_model

    llm = await asyncio.to_thread(llama_cpp_baseline.load)
    if llm is None:
        print("llama-cpp-python is not installed: no llama.cpp baseline (see requirements-bench.txt)", file=sys.stderr)
        return None
    tokenizer = await asyncio.to_thread(load_tokenizer, resolve_model("smollm2"))
    pairs, prompt_tokens = [], 0
    for i in range(args.llama_cpp):
        prompt = make_prompt(reps, f"pair-{i}")
        ours = await one_request(client, args, prompt, args.max_tokens)
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
        prompt_tokens = len(ids)
        cpp = await asyncio.to_thread(llama_cpp_baseline.greedy, llm, ids, args.max_tokens)
        if ours.ok and ours.itl_s and ours.latency_s:
            pairs.append(
                dict(
                    ours_decode_tok_s=1 / ours.itl_s,
                    ours_tok_s=ours.completion_tokens / ours.latency_s,
                    llama_cpp_decode_tok_s=cpp.decode_tok_s,
                    llama_cpp_tok_s=cpp.tok_s,
                )
            )
    if not pairs:
        return None

    def median(f) -> float:
        return statistics.median(f(p) for p in pairs)

    return dict(
        version=llama_cpp_baseline.version(),
        prompt_tokens=prompt_tokens,
        pairs=pairs,
        ours_decode_tok_s=median(lambda p: p["ours_decode_tok_s"]),
        llama_cpp_decode_tok_s=median(lambda p: p["llama_cpp_decode_tok_s"]),
        decode_ratio=median(lambda p: p["ours_decode_tok_s"] / p["llama_cpp_decode_tok_s"]),
        ours_tok_s=median(lambda p: p["ours_tok_s"]),
        llama_cpp_tok_s=median(lambda p: p["llama_cpp_tok_s"]),
        tok_s_ratio=median(lambda p: p["ours_tok_s"] / p["llama_cpp_tok_s"]),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", default="http://127.0.0.1:7860/v1", help="OpenAI API base URL (default: %(default)s)")
    ap.add_argument("--api-key", default="none", help="bearer key sent to the server (default: %(default)s)")
    ap.add_argument("--model", default=None, help="model id to request (default: the first id of GET /v1/models)")
    ap.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4, 16, 32],
        metavar="C",
        help="requests in flight at a time, one level per value (default: 1 4 16 32)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="run the levels N times in turn (1 16 1 16 ...) and print each level's medians, its "
        "speedup taken against the same round's C=1: on a shared, noisy machine (default: 1)",
    )
    ap.add_argument(
        "--requests-per-level",
        type=int,
        default=None,
        metavar="N",
        help="requests sent at each level (default: max(8, 2 x concurrency))",
    )
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: %(default)s)")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=200,
        help="approximate prompt size in tokens; the server's count is reported (default: %(default)s)",
    )
    ap.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=0,
        metavar="N",
        help="a ~N-token system message shared by every request (one assistant, many users); "
        "0 = none (default: %(default)s)",
    )
    ap.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exactly --max-tokens tokens per request (vLLM's ignore_eos extension, as its "
        "benchmarks do), so every level generates the same work; --no-ignore-eos for servers "
        "without it (default: on)",
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one request may take in all, then it counts as failed (default: %(default)s)",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=3600.0,
        help="stop the whole run after this many seconds, keeping finished levels (default: %(default)s)",
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).parent / "results" / "serve.json"),
        help="JSON results file (default: bench/results/serve.json)",
    )
    ap.add_argument(
        "--start-server",
        action="store_true",
        help="start `python app.py --port P` on a free loopback port, wait for GET /healthz == 200, "
        "benchmark it (--url is then ignored) and stop it at the end",
    )
    ap.add_argument(
        "--server-args",
        default="",
        metavar="ARGS",
        help='extra app.py flags for --start-server, one string: "--max-batch 32 --dtype bfloat16"; '
        "a --api-key other than 'none' is passed on too",
    )
    ap.add_argument(
        "--llama-cpp",
        type=int,
        default=0,
        metavar="N",
        help="with --start-server (default model): after the levels, N pairs of one request to the idle "
        "server and llama.cpp (llama-cpp-python) on the same GGUF and prompt in this process; prints the "
        "median per-pair ratios of one stream's speed (default: off)",
    )
    ap.add_argument(
        "--server-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for a --start-server server to become healthy (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    for name in ("max_tokens", "prompt_tokens", "requests_per_level", "timeout", "max_seconds", "server_timeout"):
        if (v := getattr(args, name)) is not None and v <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if any(c <= 0 for c in args.concurrency):
        ap.error("--concurrency values must be positive")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if not args.url.startswith(("http://", "https://")):
        ap.error(f"--url must start with http:// or https://, got {args.url!r}")
    if args.llama_cpp and not (args.start_server and "--model" not in shlex.split(args.server_args)):
        ap.error("--llama-cpp compares the default model: use it with --start-server and no --model")
    args.url = args.url.rstrip("/")
    args.system = ""  # set once the prompt is sized (the sizing probes go without it)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import openai  # noqa: F401
    except ImportError:
        print("error: the openai package is missing: .venv/bin/pip install 'openai>=3.51,<4'", file=sys.stderr)
        return 2
    meta = dict(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        url=args.url,
        model=args.model,
        prompt_tokens_target=args.prompt_tokens,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        concurrency=args.concurrency,
        rounds=args.rounds,
        requests_per_level=args.requests_per_level,
        timeout_s=args.timeout,
        client=dict(python=platform.python_version(), machine=platform.machine(), openai=openai.__version__),
    )
    result: dict = dict(meta=meta, ttft_alone_ms=None, levels=[])
    server, failed, rc = None, True, 1
    try:
        if args.start_server:
            extra = shlex.split(args.server_args)
            if args.api_key != "none" and "--api-key" not in extra:
                extra += ["--api-key", args.api_key]
            server = ManagedServer(extra)
            args.url = meta["url"] = server.root + "/v1"
            server.wait_healthy(args.server_timeout)
        asyncio.run(asyncio.wait_for(bench(args, result), args.max_seconds))
        failed, rc = False, 0
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
    except TimeoutError:
        print(f"\nerror: the run passed --max-seconds {args.max_seconds:g}; keeping finished levels", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        rc = 130
    finally:
        if server is not None:
            server.stop(keep_log=failed)
    if not result["levels"]:
        return rc
    levels = result["levels"]
    for lv in levels:  # against the C=1 level of the same round
        base = next((b["agg_tok_s"] for b in levels if b["concurrency"] == 1 and b["round"] == lv["round"]), None)
        lv["speedup"] = lv["agg_tok_s"] / base if base and lv["agg_tok_s"] is not None else None
    result["medians"] = level_medians(levels)
    load = next((lv for lv in levels if lv["concurrency"] == LOAD_LEVEL), None)
    result["ttft_under_load_ms"] = load["ttft_ms"]["p50"] if load else None
    prompt = dict(
        min=min((p for lv in levels if (p := lv["prompt_tokens"]["min"]) is not None), default=None),
        max=max((p for lv in levels if (p := lv["prompt_tokens"]["max"]) is not None), default=None),
    )
    meta.update(prompt_tokens=prompt, incomplete=failed)
    print_table(levels, result["ttft_alone_ms"], result["ttft_under_load_ms"], prompt)
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds (each speedup against its own round's C=1):")
        for m in result["medians"]:
            speedup = "-" if m["speedup"] is None else f"{m['speedup']:.2f}x {[round(x, 2) for x in m['speedups']]}"
            tok_s = "-" if m["agg_tok_s"] is None else f"{m['agg_tok_s']:.1f}"
            itl = "-" if m["itl_p50_ms"] is None else f"{m['itl_p50_ms']:.2f}"
            print(f"  C={m['concurrency']}: {tok_s} tok/s, ITL p50 {itl} ms, speedup {speedup}")
    if cpp := result.get("llama_cpp"):
        print(
            f"one stream, {len(cpp['pairs'])} pairs of (our server, llama.cpp {cpp['version']} in this process), "
            f"{cpp['prompt_tokens']}-token prompt, medians:\n"
            f"  decode (1 / ITL): ours {cpp['ours_decode_tok_s']:.1f} tok/s, llama.cpp "
            f"{cpp['llama_cpp_decode_tok_s']:.1f}, ratio {cpp['decode_ratio']:.2f}x\n"
            f"  with the prefill (ours: HTTP and TTFT too): ours {cpp['ours_tok_s']:.1f} tok/s, llama.cpp "
            f"{cpp['llama_cpp_tok_s']:.1f}, ratio {cpp['tok_s_ratio']:.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
