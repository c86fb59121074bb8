"""Tensor-parallel costs on the default model: bytes moved, all-reduce time, decode speed.

    .venv/bin/python bench/tp.py [--tp 3] [--tokens 32] [--batch 1 4]

1. Bytes per token: every decoder layer ends its attention (o_proj) and its MLP (down_proj)
   in an all-reduce of hidden_size values per token; the vocab-parallel embedding adds one
   more; a sampled token's logits are gathered on rank 0. Printed as a formula and a number.
2. All-reduce time: (a) inside real decode steps — rank 0's calls to all_reduce are timed
   (wall time the step spends in them, waiting for slower ranks included); (b) isolated —
   the same all-reduce, nothing else running, in a fresh group of N processes.
3. Decode tok/s at TP 1 vs TP N (greedy, same prompts, same run).
Prints a table; writes bench/results/tp.json. On a machine with fewer cores than ranks, TP
is slower than one process: the numbers say how much, and where the time goes."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.loader import read_config  # noqa: E402
from inference.model_source import resolve_model  # noqa: E402
from inference.tp_runner import tp_engine  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "Explain why the sky is blue.",
]


def bytes_per_token(hidden: int, layers: int, vocab: int, tp: int, itemsize: int) -> dict:
    reduce_payload = (2 * layers + 1) * hidden * itemsize  # per token, per all-reduce input
    ring_factor = 2 * (tp - 1) / tp  # a ring all-reduce sends this many payloads per rank
    gather = (tp - 1) * -(-vocab // tp) * 4  # float32 logits slices that travel to rank 0
    return dict(
        formula_allreduce=f"(2 x {layers} layers + 1 embedding) x hidden {hidden} x {itemsize} B",
        allreduce_payload=reduce_payload,
        allreduce_wire_per_rank=round(reduce_payload * ring_factor),
        formula_gather=f"({tp}-1) x ceil({vocab}/{tp}) x 4 B per sampled token",
        logits_gather=gather,
        allreduces_per_step=2 * layers + 1,
    )


# -- (b) isolated all-reduce in a fresh group ------------------------------------------------------
def allreduce_rank(rank: int, world: int, port: int, numel: int, repeats: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    t = torch.randn(numel)
    for _ in range(20):
        dist.all_reduce(t)
    times = []
    for _ in range(repeats):
        dist.barrier()
        s = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - s)
    if rank == 0:
        print(
            json.dumps(dict(median_us=statistics.median(times) * 1e6, p90_us=sorted(times)[int(0.9 * repeats)] * 1e6))
        )
    dist.destroy_process_group()


def isolated_allreduce(world: int, numel: int, repeats: int = 300) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def cmd(r: int) -> list[str]:
        return [
            sys.executable,
            __file__,
            "--allreduce-rank",
            str(r),
            "--tp",
            str(world),
            "--port",
            str(port),
            "--numel",
            str(numel),
            "--repeats",
            str(repeats),
        ]

    procs = [subprocess.Popen(cmd(r), stdout=subprocess.PIPE, text=True) for r in range(world)]
    out = procs[0].communicate(timeout=300)[0]
    for p in procs[1:]:
        p.wait(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


# -- decode speed and in-step all-reduce time ------------------------------------------------------
class AllReduceTimer:
    """Wraps torch.distributed.all_reduce on rank 0 (the layers call it through the module)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def timed(*a, **k):
            s = time.perf_counter()
            try:
                return self._orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - s
                self.calls += 1

        dist.all_reduce = timed
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def decode_run(engine: Engine, prompts: list[list[int]], tokens: int, timer: AllReduceTimer | None = None) -> dict:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while any(r.seq.num_computed_tokens < r.seq.num_prompt_tokens for r in engine._requests.values()):
        engine.step()  # prefill (and the first token): not part of decode speed
    made, steps, start = 0, 0, time.perf_counter()
    if timer:
        timer.seconds, timer.calls = 0.0, 0
    while engine.has_work:
        made += sum(len(o.token_ids) for o in engine.step())
        steps += 1
    wall = time.perf_counter() - start
    out = dict(tok_s=made / wall, step_ms=wall / steps * 1e3, steps=steps)
    if timer:
        out.update(
            allreduce_ms_per_step=timer.seconds / steps * 1e3,
            allreduces_per_step=timer.calls / steps,
            allreduce_share=timer.seconds / wall,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--allreduce-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--numel", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=300, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allreduce_rank is not None:
        allreduce_rank(args.allreduce_rank, args.tp, args.port, args.numel, args.repeats)
        return 0

    mcfg = read_config(resolve_model("smollm2"))
    nbytes = bytes_per_token(mcfg.hidden_size, mcfg.num_layers, mcfg.vocab_size, args.tp, 4)
    iso = {b: isolated_allreduce(args.tp, b * mcfg.hidden_size) for b in args.batch}

    cfg = EngineConfig(kv_cache_gb=0.1, max_batch=max(args.batch))
    single = Engine(cfg)
    tokenizer = single.tokenizer
    prompts = [single.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS]
    rows = []
    tp1 = {b: decode_run(single, prompts[:b], args.tokens) for b in args.batch}
    del single
    tpn_engine = tp_engine(EngineConfig(kv_cache_gb=0.1, max_batch=max(args.batch), tp=args.tp), tokenizer=tokenizer)
    try:
        with AllReduceTimer() as timer:
            tpn = {b: decode_run(tpn_engine, prompts[:b], args.tokens, timer) for b in args.batch}
    finally:
        tpn_engine.runner.close()
    for b in args.batch:
        rows.append(
            dict(
                batch=b,
                tp1_tok_s=tp1[b]["tok_s"],
                tpn_tok_s=tpn[b]["tok_s"],
                tp1_step_ms=tp1[b]["step_ms"],
                tpn_step_ms=tpn[b]["step_ms"],
                allreduce_ms_per_step=tpn[b]["allreduce_ms_per_step"],
                allreduces_per_step=tpn[b]["allreduces_per_step"],
                allreduce_share=tpn[b]["allreduce_share"],
                isolated_allreduce_us=iso[b]["median_us"],
            )
        )

    n = args.tp
    load = os.getloadavg()[0]  # other work on the machine skews every number below
    print(
        f"default model (SmolLM2-135M, {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, vocab "
        f"{mcfg.vocab_size}), float32, TP {n} over gloo on loopback, {os.cpu_count()} CPU cores, "
        f"load average {load:.1f}"
    )
    print(
        f"all-reduce payload per token: {nbytes['formula_allreduce']} = {nbytes['allreduce_payload']:,} B "
        f"({nbytes['allreduces_per_step']} all-reduces a step); ring wire bytes per rank x2(N-1)/N = "
        f"{nbytes['allreduce_wire_per_rank']:,} B"
    )
    print(f"logits gather per sampled token: {nbytes['formula_gather']} = {nbytes['logits_gather']:,} B")
    print()
    head = (
        f"{'batch':>5} {'TP1 tok/s':>10} {'TP' + str(n) + ' tok/s':>10} {'TP1 ms/step':>12} "
        f"{'TP' + str(n) + ' ms/step':>12} {'allreduce ms/step':>18} {'share':>6} {'isolated us/AR':>15}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['batch']:>5} {r['tp1_tok_s']:>10.1f} {r['tpn_tok_s']:>10.1f} {r['tp1_step_ms']:>12.1f} "
            f"{r['tpn_step_ms']:>12.1f} {r['allreduce_ms_per_step']:>18.1f} {r['allreduce_share']:>6.0%} "
            f"{r['isolated_allreduce_us']:>15.0f}"
        )
    out = dict(
        model="smollm2",
        dtype="float32",
        tp=n,
        cpu_cores=os.cpu_count(),
        load_average=round(load, 2),
        tokens=args.tokens,
        bytes_per_token=nbytes,
        rows=rows,
    )
    path = ROOT / "bench" / "results" / "tp.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
