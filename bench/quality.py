"""Quality of quantized weights: greedy agreement with the float model, and perplexity.

    .venv/bin/python bench/quality.py [--quants none int8 int4] [--also-dtypes bfloat16] [--tokens 64] [--no-hf]

For each quant of the default model, and float at `--also-dtypes` (what rounding alone does):
(a) the 20 chat prompts below, greedy, exactly `--tokens` new tokens each (end-of-turn
ignored), compared with float at `--dtype`: the share of prompts whose tokens are all
identical and the mean length of the common prefix; (b) the
perplexity of bench/data/perplexity.txt, prefilled through the engine's runner in chunks of
`max_batch_tokens`, scoring every next token. transformers on the same GGUF gives a
reference perplexity row. Prints a table; writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.layers.quant import PackableWeight  # noqa: E402
from inference.model_source import smollm2_path  # noqa: E402
from inference.scheduler import ScheduledSeq  # noqa: E402
from inference.sequence import Sequence  # noqa: E402

TEXT = Path(__file__).parent / "data" / "perplexity.txt"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me a recipe for pancakes.",
    "Write a Python function that reverses a string.",
    "What are the three states of matter?",
    "Translate 'good morning' into Spanish and German.",
    "Summarize the plot of Romeo and Juliet.",
    "List five fruits that are red.",
    "How many days are there in a leap year, and why?",
    "Write a short poem about autumn leaves.",
    "What is photosynthesis?",
    "Give three tips for a job interview.",
    "Explain what a prime number is to a ten-year-old.",
    "Write a limerick about a cat who loves cheese.",
    "What is the difference between weather and climate?",
    "Describe a busy market in the morning.",
    "Why do we have seasons on Earth?",
    "Write an email asking my neighbour to water my plants.",
    "What is 17 multiplied by 23? Show your steps.",
]
# The issue's targets: perplexity at most this multiple of the float model's.
PPL_TARGET = {"int8": 1.01, "int4": 1.03}
CHUNK_ROWS = 512  # logits rows per LM-head call while scoring (bounds memory)


def text_ids(engine: Engine) -> list[int]:
    return engine.encode(TEXT.read_text())


def engine_perplexity(engine: Engine, ids: list[int]) -> float:
    """exp(mean NLL of ids[1:]): one prefill of `ids` through the engine's runner, in chunks
    of the engine's token budget (later chunks attend to the earlier ones' KV cache)."""
    seq = Sequence(list(ids), SamplingParams(max_tokens=1))
    engine.kv.allocate(seq, len(ids))
    nll = 0.0
    try:
        for start in range(0, len(ids), engine.cfg.max_batch_tokens):
            n = min(engine.cfg.max_batch_tokens, len(ids) - start)
            inputs = engine.runner.prepare([ScheduledSeq(seq, n)])
            hidden = engine.runner.forward(inputs)
            targets = torch.tensor(ids[start + 1 : start + n + 1])  # the last chunk has one fewer
            for r in range(0, len(targets), CHUNK_ROWS):
                rows = list(range(r, min(r + CHUNK_ROWS, len(targets))))
                logits = engine.runner.logits(dataclasses.replace(inputs, sample_rows=rows), hidden)
                logp = torch.log_softmax(logits, dim=-1)
                nll -= logp.gather(1, targets[rows, None]).sum().item()
            seq.num_computed_tokens += n
    finally:
        engine.kv.free(seq)
    return math.exp(nll / (len(ids) - 1))


def hf_perplexity(ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = model(x, labels=x).loss.item()  # mean NLL of the shifted tokens
    return math.exp(loss)


def weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kernels(model: nn.Module) -> list[str]:
    """The packed-weight classes the model's linear layers run (empty for float weights)."""
    packed = (getattr(m, "packed", None) for m in model.modules())
    return sorted({type(p).__name__ for p in packed if isinstance(p, nn.Module)})


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def drop_bf16_copies(model: nn.Module) -> None:
    """Every row through the quantized kernels: on AMX, batches of 6 rows and more (the 20
    prompts, each perplexity chunk) would otherwise multiply by the bf16 copy of the float
    weight, and this would measure bf16, not the quantization."""
    for m in model.modules():
        if isinstance(m, PackableWeight):
            m.dense_copy, m.dense_rows = None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--also-dtypes",
        nargs="*",
        default=["bfloat16"],
        help="float rows at these dtypes too: how far rounding alone moves the float model",
    )
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference perplexity")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    args = ap.parse_args()
    # Float at --dtype first (the reference), then the quants, then float at other dtypes.
    runs = [(args.dtype, "none")] + [(args.dtype, q) for q in args.quants if q != "none"]
    runs += [(d, "none") for d in args.also_dtypes if d != args.dtype]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    rows, ref_tokens, ids = [], None, None
    for dtype, quant in runs:
        t0 = time.perf_counter()
        engine = Engine(EngineConfig(dtype=dtype, quant=quant, max_batch=len(PROMPTS), kv_cache_gb=0.25))
        load_s = time.perf_counter() - t0
        drop_bf16_copies(engine.loaded.model)
        prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        t0 = time.perf_counter()
        tokens = [t for t, _text, _reason in engine.generate(prompts, greedy)]
        gen_s = time.perf_counter() - t0
        assert all(len(t) == args.tokens for t in tokens)
        ref_tokens = ref_tokens or tokens
        prefixes = [common_prefix(a, b) for a, b in zip(tokens, ref_tokens)]
        ids = ids or text_ids(engine)
        t0 = time.perf_counter()
        ppl = engine_perplexity(engine, ids)
        rows.append(
            dict(
                dtype=dtype,
                quant=quant,
                resolved=engine.loaded.quant,
                kernels=kernels(engine.loaded.model),
                weights_mib=weight_bytes(engine.loaded.model) / 2**20,
                agreement=sum(p == args.tokens for p in prefixes) / len(prefixes),
                mean_common_prefix=sum(prefixes) / len(prefixes),
                common_prefixes=prefixes,
                perplexity=ppl,
                load_s=load_s,
                generate_s=gen_s,
                perplexity_s=time.perf_counter() - t0,
            )
        )
        print(f"{dtype} {quant}: ppl {ppl:.3f}, agreement {rows[-1]['agreement']:.0%}", flush=True)
        del engine
    base = rows[0]["perplexity"]
    for r in rows:
        r["ppl_ratio"] = r["perplexity"] / base
        r["ppl_target"] = PPL_TARGET.get(r["resolved"])
        r["meets_target"] = r["ppl_target"] is None or r["ppl_ratio"] <= r["ppl_target"]
    hf = None if args.no_hf else hf_perplexity(ids)

    print(f"\n{'dtype':<10}{'quant':<7}{'packed as':<20}{'weights MiB':>12}", end="")
    print(f"{'agree':>8}{'prefix':>8}{'ppl':>9}{'ratio':>8}  target")
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['resolved']:<7}{'+'.join(r['kernels']) or 'float':<20}{r['weights_mib']:>12.1f}"
            f"{r['agreement']:>8.0%}{r['mean_common_prefix']:>8.1f}{r['perplexity']:>9.3f}{r['ppl_ratio']:>8.3f}"
            + (f"  <= {r['ppl_target']:.2f} {'ok' if r['meets_target'] else 'MISSED'}" if r["ppl_target"] else "")
        )
    if hf is not None:
        print(f"{'HF':<10}{'':<7}{'float (reference)':<20}{'':>12}{'':>8}{'':>8}{hf:>9.3f}{hf / base:>8.3f}")
        print(f"our float perplexity is within {abs(base / hf - 1):.4%} of transformers' (must be < 1%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        model="smollm2",
        reference=f"{args.dtype}, quant none",
        prompts=len(PROMPTS),
        new_tokens=args.tokens,
        text=str(TEXT.relative_to(Path(__file__).parents[1])),
        text_tokens=len(ids),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        agreement="share of prompts whose greedy tokens all equal the reference's",
    )
    out.write_text(json.dumps(dict(meta=meta, rows=rows, hf_perplexity=hf), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
