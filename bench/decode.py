"""Single-sequence decode speed: our engine next to transformers' `generate`, same run.

    .venv/bin/python bench/decode.py [--dtypes float32 bfloat16] [--tokens 128] [--repeats 3]

Both sides get the same chat prompt token ids and generate exactly `--tokens` new tokens
greedily (end-of-turn ignored); tok/s = new tokens / wall time of the whole generation
(prefill included), median over repeats. Prints a table; writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.model_source import smollm2_path  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."


def time_ours(engine: Engine, ids: list[int], n: int) -> float:
    t = time.perf_counter()
    tokens = engine.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0][0]
    assert len(tokens) == n
    return n / (time.perf_counter() - t)


def time_hf(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] - len(ids) == n
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    gguf = smollm2_path()
    rows = []
    for dtype in args.dtypes:
        engine = Engine(EngineConfig(dtype=dtype, max_batch=1, kv_cache_gb=0.25))
        ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        ).eval()
        time_ours(engine, ids, 8), time_hf(hf, ids, 8)  # warm-up
        ours, ref = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both
            ours.append(time_ours(engine, ids, args.tokens))
            ref.append(time_hf(hf, ids, args.tokens))
        row = dict(
            dtype=dtype,
            prompt_tokens=len(ids),
            new_tokens=args.tokens,
            ours_tok_s=statistics.median(ours),
            hf_tok_s=statistics.median(ref),
            ours_runs=ours,
            hf_runs=ref,
        )
        row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        del engine, hf
    print(f"{'dtype':<10}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['ours_tok_s']:>12.1f}{r['hf_tok_s']:>12.1f}{r['ratio']:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        repeats=args.repeats,
        metric="new tokens / wall time of generation, median",
    )
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
