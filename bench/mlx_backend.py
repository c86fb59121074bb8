"""The MLX backend next to torch on the default model: decode speed, and what `--quant`
costs in quality (greedy agreement with torch float, perplexity).

    .venv/bin/python bench/mlx_backend.py [--backends torch mlx] [--quants none int8 int4] [--tokens 64]
                                  [--repeats 2] [--prompts 6] [--agree-tokens 24] [--ppl-tokens 256]

Per (backend, quant): decode tok/s of one greedy sequence, exactly `--tokens` new tokens after
the chat prompt of bench/decode.py (wall time, prefill included, median over repeats, every
engine loaded first and the repeats interleaved), with the time to the first token (`TTFT`)
and the tok/s of the tokens after it (`decode`) split out; the
first `--prompts` chat prompts of bench/quality.py generated together, `--agree-tokens` tokens
each, compared with torch float (`agree`: share of prompts with identical tokens, `prefix`:
mean common prefix); the perplexity of the first `--ppl-tokens` tokens of
bench/data/perplexity.txt (prefilled through the runner, as bench/quality.py does). The
sizes default small: MLX's Linux CPU build multiplies through the reference BLAS it bundles
(~2-4 GFLOP/s here), so a full-size run takes long. Prints a table; writes
bench/results/mlx.json.
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

from bench.decode import PROMPT, common_prefix, cpu_info, time_ours  # noqa: E402
from bench.quality import PROMPTS, engine_perplexity, text_ids, weight_bytes  # noqa: E402
from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402


def build(backend: str, quant: str, prompts: int, tokenizer) -> Engine:
    cfg = EngineConfig(quant=quant, max_batch=max(prompts, 1), kv_cache_gb=0.1, max_batch_tokens=256)
    if backend == "torch":
        return Engine(cfg, tokenizer=tokenizer)
    from inference.mlx.engine import mlx_engine

    return mlx_engine(cfg, tokenizer=tokenizer)


def mlx_weight_bytes(engine: Engine) -> int:
    from mlx.utils import tree_flatten

    runner = engine.runner
    return sum(a.nbytes for _, a in tree_flatten(runner.model.parameters()))  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "mlx"])
    ap.add_argument("--quants", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--agree-tokens", type=int, default=24)
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mlx.json"))
    args = ap.parse_args()
    import mlx.core as mx

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items()))
    threads = torch.get_num_threads()
    print(f"mlx {mx.__version__} on {mx.default_device()}, torch {torch.__version__} ({threads} threads)")
    greedy = SamplingParams(temperature=0, max_tokens=args.agree_tokens, ignore_eos=True)
    engines: dict[tuple[str, str], Engine] = {}
    load_s: dict[tuple[str, str], float] = {}
    tokenizer = None
    for backend in args.backends:
        for quant in args.quants:
            t0 = time.perf_counter()
            engines[backend, quant] = build(backend, quant, args.prompts, tokenizer)
            load_s[backend, quant] = time.perf_counter() - t0
            tokenizer = engines[backend, quant].tokenizer
    first = next(iter(engines.values()))
    ids = first.encode_chat([{"role": "user", "content": PROMPT}])
    for engine in engines.values():
        time_ours(engine, ids, 4)  # warm-up
    runs: dict[tuple[str, str], list[float]] = {k: [] for k in engines}
    prefill: dict[tuple[str, str], list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):  # interleaved, as bench/decode.py: drifting machine load hits all alike
        for key, engine in engines.items():
            runs[key].append(time_ours(engine, ids, args.tokens)[0])
            prefill[key].append(1 / time_ours(engine, ids, 1)[0])  # the prompt and one token, seconds
    prompts = [first.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    text = text_ids(first)[: args.ppl_tokens]
    rows: list[dict] = []
    ref: list[list[int]] | None = None
    for (backend, quant), engine in engines.items():
        tokens = [t for t, _text, _reason in engine.generate(prompts, greedy)]
        ref = ref or tokens  # the first row (torch float by default) is the reference
        prefixes = [common_prefix(a, b) for a, b in zip(tokens, ref)]
        t0 = time.perf_counter()
        ppl = engine_perplexity(engine, text)
        weights = mlx_weight_bytes(engine) if backend == "mlx" else weight_bytes(engine.loaded.model)
        tok_s, first_s = statistics.median(runs[backend, quant]), statistics.median(prefill[backend, quant])
        rows.append(
            dict(
                backend=backend,
                quant=engine.loaded.quant,
                tok_s=tok_s,
                runs=runs[backend, quant],
                first_token_s=first_s,
                decode_tok_s=(args.tokens - 1) / (args.tokens / tok_s - first_s),
                agreement=sum(p == args.agree_tokens for p in prefixes) / len(prefixes),
                mean_common_prefix=sum(prefixes) / len(prefixes),
                perplexity=ppl,
                weights_mib=weights / 2**20,
                load_s=load_s[backend, quant],
                perplexity_s=time.perf_counter() - t0,
            )
        )
        r = rows[-1]
        print(f"{backend} {r['quant']}: {r['tok_s']:.1f} tok/s, ppl {ppl:.3f}, agree {r['agreement']:.0%}")
    base = rows[0]
    print(
        f"\n{'backend':<9}{'quant':<7}{'tok/s':>8}{'vs first':>10}{'TTFT s':>8}{'decode':>8}{'weights MiB':>13}", end=""
    )
    print(f"{'agree':>8}{'prefix':>8}{'ppl':>9}{'ratio':>8}")
    for r in rows:
        r["speed_ratio"] = r["tok_s"] / base["tok_s"]
        r["ppl_ratio"] = r["perplexity"] / base["perplexity"]
        print(
            f"{r['backend']:<9}{r['quant']:<7}{r['tok_s']:>8.1f}{r['speed_ratio']:>10.2f}{r['first_token_s']:>8.2f}"
            f"{r['decode_tok_s']:>8.1f}{r['weights_mib']:>13.1f}"
            f"{r['agreement']:>8.0%}{r['mean_common_prefix']:>8.1f}{r['perplexity']:>9.3f}{r['ppl_ratio']:>8.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        model="smollm2",
        cpu=cpu,
        machine=platform.machine(),
        mlx=mx.__version__,
        mlx_device=str(mx.default_device()),
        torch=torch.__version__,
        threads=threads,
        new_tokens=args.tokens,
        repeats=args.repeats,
        prompts=args.prompts,
        agree_tokens=args.agree_tokens,
        ppl_tokens=args.ppl_tokens,
        reference=f"{base['backend']} {base['quant']}",
        metric="tok/s: new tokens / wall time of one greedy generation, prefill included, median; "
        "TTFT s: the prompt and one token; decode: the other tokens / the rest of the time",
        agreement="share of prompts whose greedy tokens all equal the reference's",
    )
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
