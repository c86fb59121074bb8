"""What constrained decoding costs: the grammar engine on its own, the sampler with one
constrained row in a batch of 8, and whole engine decode steps.

    .venv/bin/python bench/grammar.py [--steps 200] [--engine-steps 24] [--no-engine]

1. engine: compile time of a grammar and the mask + advance time per token of llguidance
   on the default model's tokenizer (49k tokens), replaying a fixed JSON document.
2. sampler: one `Sampler` call on a batch of 8 rows of logits (greedy, and sampled at
   temperature 0.8), with 0, 1 or 8 rows under a grammar; the masks advance along the
   same document, so every step does real work. Median ms per call.
3. engine step (unless --no-engine): a decode step of the real model with 8 running
   sequences, none or one of them constrained (json_schema), the two interleaved over
   --rounds; median ms per step, and of the sampler's call within it.
Prints the CPU and a table; writes bench/results/grammar.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# OpenMP's spin-waiting collapses on a shared 2-core machine (tests/test_api.py sets the same):
# without it, 50k-element torch ops measured 100x slower there, drowning what is measured here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import cpu_info  # noqa: E402
from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine, load_tokenizer  # noqa: E402
from inference.grammar import Grammar, GrammarCompiler  # noqa: E402
from inference.model_source import resolve_model  # noqa: E402
from inference.sampler import Sampler, SamplerState  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "species": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer"},
        "toys": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}}},
    },
    "required": ["name", "species", "age", "toys", "owner"],
    "additionalProperties": False,
}
DOC = {
    "name": "Luna the second",
    "species": "cat",
    "age": 7,
    "toys": ["a red ball", "string", "a cardboard box"],
    "owner": {"name": "Ann Smith", "city": "Oslo, Norway"},
}


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def bench_engine(tokenizer, vocab: int, eos: int, doc_ids: list[int]) -> dict:
    out = {}
    compiler = GrammarCompiler(tokenizer, vocab, [eos])
    t = time.perf_counter()
    compiler.check(Grammar.json_object())  # builds the token trie
    out["token_trie_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    row = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    for name, grammar in (("json_schema", Grammar.json_schema(SCHEMA)), ("json_object", Grammar.json_object())):
        t = time.perf_counter()
        compiler.check(grammar)
        compile_ms = (time.perf_counter() - t) * 1e3
        per_token = []
        for _ in range(5):
            m = compiler.matcher(grammar)
            for tok in doc_ids:
                t = time.perf_counter()
                m.fill_mask(row)
                assert m.accept(tok)
                per_token.append(time.perf_counter() - t)
        out[name] = {"compile_ms": round(compile_ms, 2), "mask_and_advance_ms": median_ms(per_token)}
    return out


def bench_sampler(compiler: GrammarCompiler, vocab: int, doc_ids: list[int], steps: int) -> list[dict]:
    torch.manual_seed(0)
    sampler = Sampler()
    grammar = Grammar.json_schema(SCHEMA)
    compiler.check(grammar)
    rows = []
    for temperature in (0.0, 0.8):
        for constrained in (0, 1, 8):
            params = SamplingParams(temperature=temperature, seed=1, max_tokens=10**6)
            states = [SamplerState(params, [1]) for _ in range(8)]
            times = []
            pos = 0
            for _ in range(steps):
                if pos == 0:  # restart the document: fresh matchers at its start
                    for s in states[:constrained]:
                        s.grammar = compiler.matcher(grammar)
                logits = torch.randn(8, vocab)
                t = time.perf_counter()
                sampler(logits, states)
                times.append(time.perf_counter() - t)
                for s in states:
                    s.observe(doc_ids[pos])  # replay the document: the masks do real work
                pos = (pos + 1) % len(doc_ids)
            rows.append({"temperature": temperature, "constrained_rows": constrained, "ms_per_call": median_ms(times)})
    return rows


def bench_steps(engine: Engine, steps: int, rounds: int) -> list[dict]:
    """Decode steps of 8 greedy sequences, none or one constrained, interleaved over `rounds`
    (so a change in the machine's load hits both alike); also the sampler's share of a step."""
    prompt = engine.encode_chat([{"role": "user", "content": "Describe a pet as JSON."}])
    grammar = Grammar.json_schema(SCHEMA)
    engine.check_grammar(grammar)
    sampler, sampler_times = engine.sampler, []

    def timed_sampler(logits, states):
        t = time.perf_counter()
        out = sampler(logits, states)
        sampler_times.append(time.perf_counter() - t)
        return out

    engine.sampler = timed_sampler  # type: ignore[assignment]
    step_times: dict[int, list[float]] = {0: [], 1: []}
    sample_times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(rounds):
        for constrained in (0, 1):
            params = [SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True) for _ in range(8)]
            for p in params[:constrained]:
                p.grammar = grammar
            ids = [engine.add_request(prompt, p) for p in params]
            while any(engine._requests[i].seq.num_computed_tokens < len(prompt) for i in ids):
                engine.step()  # prefill
            sampler_times.clear()
            for _ in range(steps):
                t = time.perf_counter()
                engine.step()
                step_times[constrained].append(time.perf_counter() - t)
            sample_times[constrained] += sampler_times
            # A constrained sequence that completed its JSON would have left the batch early.
            assert all(i in engine._requests for i in ids), "a sequence finished early: use fewer --engine-steps"
            for i in ids:
                engine.abort(i)
            engine.step()
    engine.sampler = sampler
    return [
        {
            "constrained_of_8": c,
            "ms_per_step": median_ms(step_times[c]),
            "sampler_ms_per_step": median_ms(sample_times[c]),
        }
        for c in (0, 1)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="sampler calls per row")
    ap.add_argument("--engine-steps", type=int, default=24, help="decode steps per engine row and round")
    ap.add_argument("--rounds", type=int, default=3, help="engine rows interleaved this many times")
    ap.add_argument("--no-engine", action="store_true", help="skip the real-model decode steps")
    args = ap.parse_args()

    tokenizer = load_tokenizer(resolve_model("smollm2"))
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    doc_ids = tokenizer.encode(json.dumps(DOC), add_special_tokens=False)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}  threads: {torch.get_num_threads()}  vocab: {vocab}  document: {len(doc_ids)} tokens")

    eng = bench_engine(tokenizer, vocab, eos, doc_ids)
    print(f"\nllguidance: token trie {eng['token_trie_ms']} ms (once per process)")
    print(f"{'grammar':<12} {'compile ms':>11} {'mask+advance ms/token':>22}")
    for name in ("json_schema", "json_object"):
        print(f"{name:<12} {eng[name]['compile_ms']:>11} {eng[name]['mask_and_advance_ms']:>22}")

    compiler = GrammarCompiler(tokenizer, vocab, [eos])
    sampler_rows = bench_sampler(compiler, vocab, doc_ids, args.steps)
    print("\nSampler, batch of 8")
    print(f"{'temperature':>11} {'constrained rows':>17} {'ms/call':>8}")
    for r in sampler_rows:
        print(f"{r['temperature']:>11} {r['constrained_rows']:>17} {r['ms_per_call']:>8}")

    step_rows: list[dict] = []
    if not args.no_engine:
        engine = Engine(EngineConfig(kv_cache_gb=0.25, max_batch=8, quant="auto"), tokenizer=tokenizer)
        step_rows = bench_steps(engine, args.engine_steps, args.rounds)
        print(f"\nEngine decode step, 8 sequences (quant {engine.loaded.quant}, greedy)")
        print(f"{'constrained':>11} {'ms/step':>8} {'sampler ms/step':>16}")
        for r in step_rows:
            print(f"{r['constrained_of_8']:>11} {r['ms_per_step']:>8} {r['sampler_ms_per_step']:>16}")

    out = Path(__file__).resolve().parent / "results" / "grammar.json"
    result = {"cpu": cpu, "threads": torch.get_num_threads(), "grammar_engine": "llguidance", "engine": eng}
    result |= {"sampler_batch8": sampler_rows, "engine_step_batch8": step_rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
