"""Single-sequence decode speed: our engine (dtype x quant) next to transformers' `generate`
and, when llama-cpp-python is installed, llama.cpp on the same GGUF, same run.

    .venv/bin/python bench/decode.py [--dtypes float32 bfloat16] [--quants none int8 int4]
                                     [--tokens 128] [--repeats 3] [--torch-ops] [--ceiling]

Every side gets the same chat prompt token ids and generates exactly `--tokens` new tokens
greedily (end-of-turn ignored); tok/s = new tokens / wall time of the whole generation
(prefill included), median over repeats, the backends interleaved within each repeat.
`vs HF` compares with transformers at the row's dtype (llama.cpp: the first dtype);
`agree` is the common prefix of the row's tokens with our first dtype's float ("none") ones.
`--torch-ops` adds a row per quant with the fused CPU kernels off (inference/kernels.py), to
show what they gain in the same run. `--ceiling` adds a row per quant timing only the model's
matmuls (each layer's four and the LM head, one row each, as many times as tokens): the
speed no decode step with these weights and kernels can beat on this machine.
Prints the CPU, a table; writes bench/results/decode.json.
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

from bench import llama_cpp_baseline  # noqa: E402
from inference import kernels  # noqa: E402
from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.model_source import smollm2_path  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU's model name (and family/model numbers: a VM may hide the name) and the flags
    that decide which kernels are fast."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return dict(model=name, flags={f: f in flags for f in CPU_FLAGS})


def time_ours(engine: Engine, ids: list[int], n: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    tokens = engine.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0][0]
    dt = time.perf_counter() - t
    assert len(tokens) == n
    return n / dt, tokens


def time_ours_torch_ops(engine: Engine, ids: list[int], n: int) -> tuple[float, list[int]]:
    with kernels.torch_ops_only():
        return time_ours(engine, ids, n)


def time_matmuls(engine: Engine, ids: list[int], n: int) -> tuple[float, list[int] | None]:
    model = engine.runner.model  # an in-process ModelRunner
    cfg = model.config
    h = torch.zeros(1, cfg.hidden_size)
    attn_out = torch.zeros(1, cfg.num_heads * cfg.head_dim)
    inter = torch.zeros(1, cfg.intermediate_size)
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(n):
            for layer in model.model.layers:
                layer.self_attn.qkv_proj(h)
                layer.self_attn.o_proj(attn_out)
                layer.mlp.gate_up_proj(h)
                layer.mlp.down_proj(inter)
            model.lm_head(h)
        dt = time.perf_counter() - t
    return n / dt, None


def time_hf(model, ids: list[int], n: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] - len(ids) == n
    return n / dt, out[0, len(ids) :].tolist()


def time_llama_cpp(llm, ids: list[int], n: int) -> tuple[float, list[int]]:
    run = llama_cpp_baseline.greedy(llm, ids, n)
    return run.tok_s, run.tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--quants", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-ops", action="store_true", help="also time ours with the fused CPU kernels off")
    ap.add_argument("--ceiling", action="store_true", help="also time only the model's matmuls (the speed ceiling)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items()))
    gguf = smollm2_path()
    llm = llama_cpp_baseline.load()
    if llm is None:
        print("llama-cpp-python is not installed: no llama.cpp row (see requirements-bench.txt)")
    rows: list[dict] = []
    cpp_runs: list[float] = []
    cpp_tokens: list[int] = []
    for dtype in args.dtypes:
        engines = {q: Engine(EngineConfig(dtype=dtype, quant=q, max_batch=1, kv_cache_gb=0.25)) for q in args.quants}
        ids = next(iter(engines.values())).encode_chat([{"role": "user", "content": PROMPT}])
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        ).eval()
        timers = {("ours", q): (time_ours, e) for q, e in engines.items()}
        if args.torch_ops:
            timers.update({("ours, torch ops", q): (time_ours_torch_ops, e) for q, e in engines.items()})
        if args.ceiling:
            timers.update({("matmuls only", q): (time_matmuls, e) for q, e in engines.items()})
        timers["transformers", "none"] = (time_hf, hf)
        if llm is not None:
            timers["llama.cpp", "gguf"] = (time_llama_cpp, llm)
        for fn, obj in timers.values():  # warm-up
            fn(obj, ids, 8)
        runs: dict[tuple[str, str], list[float]] = {k: [] for k in timers}
        tokens: dict[tuple[str, str], list[int]] = {}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
            for key, (fn, obj) in timers.items():
                tok_s, tokens[key] = fn(obj, ids, args.tokens)
                runs[key].append(tok_s)
        found = []
        for (backend, quant), r in runs.items():
            if backend == "llama.cpp":  # the same GGUF whatever the dtype: one row at the end
                cpp_runs += r
                cpp_tokens = tokens[backend, quant]
                continue
            resolved = engines[quant].loaded.quant if backend != "transformers" else "none"
            found.append(dict(backend=backend, dtype=dtype, quant=resolved, tok_s=statistics.median(r), runs=r))
            found[-1]["tokens"] = tokens[backend, quant]
        hf_tok_s = statistics.median(runs["transformers", "none"])
        for row in found:
            row.update(prompt_tokens=len(ids), new_tokens=args.tokens, vs_hf=row["tok_s"] / hf_tok_s)
        rows += found
        del engines, hf, timers
    if llm is not None:
        first_hf = next(r for r in rows if r["backend"] == "transformers")
        cpp = statistics.median(cpp_runs)
        rows.append(
            dict(
                backend="llama.cpp",
                dtype="gguf Q4_1",
                quant="Q4_1",
                tok_s=cpp,
                runs=cpp_runs,
                tokens=cpp_tokens,
                prompt_tokens=len(ids),
                new_tokens=args.tokens,
                vs_hf=cpp / first_hf["tok_s"],
            )
        )
    ref = next((r for r in rows if r["backend"] == "ours" and r["quant"] == "none"), rows[0])["tokens"]
    for r in rows:
        got = r.pop("tokens")
        r["agree_with_float"] = None if got is None else common_prefix(got, ref)
        if llm is not None:
            r["vs_llama_cpp"] = r["tok_s"] / rows[-1]["tok_s"]

    print(f"{'backend':<17}{'dtype':<11}{'quant':<7}{'tok/s':>8}{'vs HF':>8}{'vs llama.cpp':>14}{'agree':>7}")
    for r in rows:
        cpp_col = f"{r['vs_llama_cpp']:>14.2f}" if "vs_llama_cpp" in r else f"{'-':>14}"
        print(
            f"{r['backend']:<17}{r['dtype']:<11}{r['quant']:<7}{r['tok_s']:>8.1f}{r['vs_hf']:>8.2f}{cpp_col}"
            f"{'-' if r['agree_with_float'] is None else r['agree_with_float']:>7}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        cpu=cpu,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        llama_cpp=llama_cpp_baseline.version(),
        fused_kernels=kernels.available(),
        repeats=args.repeats,
        metric="new tokens / wall time of generation, median",
        agree_with_float="common prefix of the row's greedy tokens with ours, first dtype, quant none",
    )
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
