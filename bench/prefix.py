"""What the prefix cache saves, through the OpenAI API of two real servers started in turn:
one with --no-prefix-cache (the baseline: every prompt computed in full) and one default.

    .venv/bin/python bench/prefix.py [--history-tokens 2000] [--system-tokens 1000] [--users 16]

1. A conversation: turn 1 sends a ~--history-tokens history (system prompt and a long user
   message), turn 2 re-sends it with the reply and a new question, as chat clients do.
   Time to first token of each turn, median over --conversations distinct conversations.
2. --users users, all at once, behind one ~--system-tokens system prompt, each with a
   distinct short question: the prompt tokens the server really computed (sent minus
   usage.prompt_tokens_details.cached_tokens) and the first-token p50. (bench/serve.py
   --system-prompt-tokens N runs its levels behind such a shared prompt too.)
Prints a table with each ratio and the issue's target; writes bench/results/prefix.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve  # noqa: E402  (bench/serve.py: the managed server and one benchmark level)

sys.path.insert(0, str(serve.ROOT))

WORDS = "amber basil cedar delta ember fjord grove harbor iris juniper kelp lagoon meadow north orchid".split()


def text_of(tokenizer, tokens: int, seed: int) -> str:
    """Words whose encoding is about `tokens` tokens; `seed` makes each text distinct from its start."""
    words, out = WORDS[seed % len(WORDS) :] + WORDS[: seed % len(WORDS)], [f"Story {seed}:"]
    while len(tokenizer.encode(" ".join(out))) < tokens:
        out += [words[(len(out) * 7 + seed) % len(words)] for _ in range(max(1, (tokens - len(out)) // 2))]
    return " ".join(out)


async def stream_chat(client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """(seconds to the first content chunk, the reply, the usage) of one streamed chat."""
    t0, ttft, parts, usage = time.perf_counter(), None, [], {}
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(choice.delta.content)
    if ttft is None:
        raise serve.BenchError("a reply had no content")
    return ttft, "".join(parts), usage


async def conversations(client, model: str, tokenizer, args) -> dict:
    turn1, turn2, cached2 = [], [], []
    # Conversation 0 warms the server up at these sizes and is left out of the medians.
    for k in range(args.conversations + 1):
        history = [
            {"role": "system", "content": f"Conversation {k}. You are a careful reader."},
            {"role": "user", "content": text_of(tokenizer, args.history_tokens, 100 + k) + "\nWhat is this about?"},
        ]
        t1, reply, usage1 = await stream_chat(client, model, history, args.reply_tokens)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Say it in one line."}]
        t2, _, usage2 = await stream_chat(client, model, history, args.reply_tokens)
        cached = (usage2.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if k:
            turn1.append(t1)
            turn2.append(t2)
            cached2.append(cached)
        print(
            f"  conversation {k}: turn 1 {usage1['prompt_tokens']} tokens, TTFT {t1 * 1000:.0f} ms; "
            f"turn 2 {usage2['prompt_tokens']} tokens ({cached} cached), TTFT {t2 * 1000:.0f} ms"
            + ("" if k else " (warm-up)"),
            file=sys.stderr,
        )
    return dict(
        turn1_ttft_ms=round(statistics.median(turn1) * 1000, 1),
        turn2_ttft_ms=round(statistics.median(turn2) * 1000, 1),
        turn2_cached_tokens=cached2,
        history_tokens=usage1["prompt_tokens"],
    )


async def shared_system(client, model: str, tokenizer, args) -> dict:
    """--users chats at once: one shared system prompt, each its own short question."""
    system = text_of(tokenizer, args.system_tokens, 7)

    async def user(i: int) -> tuple[float, dict]:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"User {i} asks: what happens next?"},
        ]
        ttft, _, usage = await stream_chat(client, model, messages, args.reply_tokens)
        return ttft, usage

    t0 = time.perf_counter()
    done = await asyncio.gather(*(user(i) for i in range(args.users)))
    wall = time.perf_counter() - t0
    sent = sum(u["prompt_tokens"] for _, u in done)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for _, u in done)
    return dict(
        ttft_p50_ms=round(serve.pct([t for t, _ in done], 50) * 1000, 1),
        prompt_tokens_sent=sent,
        prompt_tokens_computed=sent - cached,
        wall_s=round(wall, 2),
    )


async def measure(url: str, tokenizer, args) -> dict:
    import openai

    http = openai.DefaultAsyncHttpxClient(trust_env=False)  # no proxy env: only ever this server
    kw = dict(base_url=url, api_key="none", max_retries=0, timeout=args.timeout, http_client=http)
    async with openai.AsyncOpenAI(**kw) as c:
        model = (await c.models.list()).data[0].id
        await stream_chat(c, model, [{"role": "user", "content": "Hello."}], 2)  # warm-up
        conv = await conversations(c, model, tokenizer, args)
        shared = await shared_system(c, model, tokenizer, args)
        status = await asyncio.to_thread(serve.get_json, url.removesuffix("/v1") + "/api/status", 5)
    return dict(conversation=conv, shared_system=shared, prefix_cache=(status or {}).get("prefix_cache"))


def row(name: str, off: float, on: float, target: str) -> tuple[str, str, str, str, str]:
    return name, f"{off:.0f}", f"{on:.0f}", f"{on / off:.3f}" if off else "-", target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/prefix.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--history-tokens", type=int, default=2000, help="turn 1's prompt size (default: %(default)s)")
    ap.add_argument("--conversations", type=int, default=3, help="conversations measured (default: %(default)s)")
    ap.add_argument("--system-tokens", type=int, default=1000, help="shared system prompt (default: %(default)s)")
    ap.add_argument("--users", type=int, default=16, help="concurrent users sharing it (default: %(default)s)")
    ap.add_argument("--reply-tokens", type=int, default=16, help="max_tokens of every reply (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    ap.add_argument("--server-args", default="", help="extra app.py flags for both servers, one string")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefix.json"), help="JSON results file")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from inference.model_source import resolve_model

    model_arg = next((a.split("=", 1)[-1] for a in args.server_args.split() if a.startswith("--model")), None)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model_arg or "smollm2")))
    runs = {}
    for mode, flags in (("no_cache", ["--no-prefix-cache"]), ("prefix_cache", [])):
        server = serve.ManagedServer([*args.server_args.split(), *flags])
        failed = True
        try:
            server.wait_healthy(600)
            print(f"{mode}:", file=sys.stderr)
            runs[mode] = asyncio.run(measure(server.root + "/v1", tokenizer, args))
            failed = False
        except serve.BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            server.stop(keep_log=failed)
    off, on = runs["no_cache"], runs["prefix_cache"]
    rows = [
        ("turn 1 TTFT, ms (median)", *[f"{r['conversation']['turn1_ttft_ms']:.0f}" for r in (off, on)], "-", ""),
        row("turn 2 TTFT, ms (median)", off["conversation"]["turn2_ttft_ms"], on["conversation"]["turn2_ttft_ms"], ""),
        (
            "turn 2 / turn 1 TTFT",
            *[f"{r['conversation']['turn2_ttft_ms'] / r['conversation']['turn1_ttft_ms']:.3f}" for r in (off, on)],
            "-",
            "<= 0.20 with the cache",
        ),
        row(
            f"{args.users} users: prompt tokens computed",
            off["shared_system"]["prompt_tokens_computed"],
            on["shared_system"]["prompt_tokens_computed"],
            "<= 0.10",
        ),
        row(
            f"{args.users} users: TTFT p50, ms",
            off["shared_system"]["ttft_p50_ms"],
            on["shared_system"]["ttft_p50_ms"],
            "<= 0.30",
        ),
    ]
    head = ("", "no cache", "prefix cache", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    result = dict(
        meta=dict(
            date=datetime.now(UTC).isoformat(timespec="seconds"),
            args=vars(args),
            machine=platform.machine(),
            cpu=platform.processor() or None,
            history_tokens=on["conversation"]["history_tokens"],
        ),
        **runs,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
