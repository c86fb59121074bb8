"""`python -m inference.generate --prompt "..."`: stream one completion to stdout.

Only the generated text goes to stdout; load time and speed go to stderr."""

from __future__ import annotations

import argparse
import sys
import time

from . import cli
from .config import EngineConfig, SamplingParams
from .errors import InferenceError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inference.generate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_model_source(p)
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--system", default=None, help="optional system message (chat mode only)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as is")
    p.add_argument("--max-tokens", type=int, default=256, help="maximum tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    cli.add_compute(p)
    cli.add_quant(p)
    cli.add_kv_cache(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging("info" if args.verbose else "warning", stream=sys.stderr)
    from .engine import Engine  # heavy imports after argument errors have had their say

    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens
        )
        engine = Engine(
            EngineConfig(
                model=args.model,
                dtype=args.dtype,
                device=args.device,
                attn=args.attn,
                kv_cache_gb=args.kv_cache_gb,
                max_batch=1,
                quant=args.quant,
            )
        )
        if args.raw:
            ids = engine.encode(args.prompt)
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            ids = engine.encode_chat(messages + [{"role": "user", "content": args.prompt}])
        engine.add_request(ids, params)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.model} in {engine.load_seconds:.1f} s; prompt {len(ids)} tokens", file=sys.stderr)
    t0 = time.perf_counter()
    first = None
    n = 0
    reason = None
    try:
        while engine.has_work:
            for out in engine.step():
                if first is None and out.token_ids:
                    first = time.perf_counter()
                n += len(out.token_ids)
                sys.stdout.write(out.text)
                sys.stdout.flush()
                reason = out.finish_reason or reason
    except KeyboardInterrupt:
        reason = "interrupted"
    end = time.perf_counter()
    sys.stdout.write("\n")
    decode = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    print(
        f"{n} tokens in {end - t0:.2f} s (first token {(first or end) - t0:.2f} s); "
        f"decode {decode:.1f} tok/s; finish: {reason}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
