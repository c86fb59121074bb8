"""Communication costs of the pipeline: what a hop over the stage channel costs.

    .venv/bin/python bench/comm.py [--tokens 1 16 256 4096] [--repeats 20] [--skip-pipeline]

1. Transfer: a (tokens x hidden) step sent over one persistent gRPC stream to a stage in
   another process, which decodes and validates it (as a real stage does) and answers with
   a tiny message; bfloat16 / float16 / float32, raw and zlib. Median round trip.
2. Per-hop overhead of a decode step: a ping on the same stream (no tensors), and a
   1-token step (576 floats, the default model's hidden size).
3. Pipeline decode: one greedy stream through two real stage processes (layers 0-15 and
   15-30 of the default model) against the single-process engine, same run, same prompt,
   round the ring (the last stage answers the master's result endpoint: 3 hops a step).
Prints tables; writes bench/results/comm.json."""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc  # noqa: E402
import torch  # noqa: E402

from cluster.stage_stream import GRPC_OPTIONS, MAX_STEP_BYTES  # noqa: E402
from cluster.tensor_wire import decode_step, encode_step  # noqa: E402
from proto import stage_pb2, stage_pb2_grpc  # noqa: E402

HIDDEN = 576  # SmolLM2-135M


class Sink(stage_pb2_grpc.StageServicer):
    """Decodes every step like a stage would, runs no layers, answers with no tensor."""

    def Steps(self, request_iterator, context):
        for req in request_iterator:
            if not req.ping:
                decode_step(req, MAX_STEP_BYTES)
            yield stage_pb2.StepResponse(step_id=req.step_id)


def serve_sink(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=GRPC_OPTIONS)
    stage_pb2_grpc.add_StageServicer_to_server(Sink(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    server.wait_for_termination()


def make_step(tokens: int, dtype: torch.dtype, compression: str, step_id: int) -> stage_pb2.StepRequest:
    hidden = torch.randn(tokens, HIDDEN).to(dtype)
    return encode_step(
        step_id,
        hidden,
        torch.arange(tokens),
        torch.arange(tokens),
        torch.zeros(1, -(-tokens // 16) or 1, dtype=torch.long),
        [tokens],
        [tokens],
        1 if tokens == 1 else 0,
        16,
        compression,
    )


class RoundTrip:
    """One persistent Steps stream driven one request at a time: send, wait for the answer."""

    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._requests: queue.Queue = queue.Queue()
        self._answers = stage_pb2_grpc.StageStub(self._channel).Steps(iter(self._requests.get, None), timeout=600)

    def step(self, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        self._requests.put(req)
        return next(self._answers)

    def close(self) -> None:
        self._requests.put(None)
        self._channel.close()


def timed(client: RoundTrip, req: stage_pb2.StepRequest, repeats: int) -> float:
    client.step(req)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        client.step(req)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def spawn(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"could not start {args}: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


def transfer_table(tokens: list[int], repeats: int) -> tuple[list[dict], dict]:
    proc, addr = spawn([__file__, "--serve-sink"])
    client = RoundTrip(addr)
    rows = []
    try:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for compression in ("", "zlib"):
                for n in tokens:
                    req = make_step(n, dtype, compression, 1)
                    ms = timed(client, req, repeats if n <= 256 else max(3, repeats // 4))
                    raw = n * HIDDEN * dtype.itemsize
                    rows.append(
                        dict(
                            tokens=n,
                            dtype=str(dtype).removeprefix("torch."),
                            compression=compression or "none",
                            bytes=raw,
                            wire_bytes=len(req.hidden.data),
                            ms=ms,
                            mb_s=raw / ms / 1e3,
                        )
                    )
        ping = stage_pb2.StepRequest(step_id=7, ping=True)
        hop = dict(
            ping_ms=timed(client, ping, repeats * 5),
            decode_step_ms=timed(client, make_step(1, torch.float32, "", 1), repeats * 5),
        )
    finally:
        client.close()
        proc.kill()
    return rows, hop


def pipeline_decode(new_tokens: int, repeats: int) -> dict:
    from cluster.data_auth import PlanAuth
    from cluster.pipeline import PipelineRunner
    from cluster.ring import ResultServer, RingClient
    from inference.config import EngineConfig, LayerRange, SamplingParams
    from inference.engine import Engine
    from inference.loader import load_model
    from inference.model_runner import ModelRunner

    blocks = 256
    stage = ["-m", "cluster.stage_server", "--num-blocks", str(blocks), "--port", "0"]
    secret = secrets.token_hex(16)  # the data-plane secret the stages and this driver share
    env = dict(os.environ, RINGLLM_SECRET=secret)
    w2, a2 = spawn(stage + ["--layers", "15", "30"], env)
    w1, a1 = spawn(stage + ["--layers", "0", "15", "--next-hop", a2], env)
    plan = PlanAuth(["stage-0-15", "stage-15-30"], secret.encode())
    try:
        single = Engine(EngineConfig(max_batch=1, kv_cache_gb=0.1))
        ends = load_model("smollm2", layers=LayerRange(0, 0, 30, embed=True, head=True))
        local = ModelRunner(ends.model, ends.config, ends.layers, blocks, 16, torch.float32, "cpu")
        results = ResultServer()
        port = results.start("127.0.0.1", 0)
        piped = Engine(
            EngineConfig(max_batch=1),
            loaded=ends,
            tokenizer=single.tokenizer,
            num_blocks=blocks,
            runner=PipelineRunner(local, RingClient(a1, results, f"127.0.0.1:{port}", plan)),
        )
        ids = single.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

        def rate(engine: Engine) -> float:
            t = time.perf_counter()
            engine.generate([ids], params)
            return new_tokens / (time.perf_counter() - t)

        rate(single), rate(piped)  # warm-up
        a, b = [], []
        for _ in range(repeats):  # interleaved, so machine noise hits both
            a.append(rate(single))
            b.append(rate(piped))
        same = single.generate([ids], params)[0][0] == piped.generate([ids], params)[0][0]
        sa, sb = statistics.median(a), statistics.median(b)
        results.stop()
        # What the ring adds to a decode step over the single process, spread over its 3 hops
        # (master -> stage 1 -> stage 2 -> master); the layers cost the same in both.
        hop_ms = (1 / sb - 1 / sa) * 1e3 / 3
        return dict(
            single_tok_s=sa,
            pipeline_tok_s=sb,
            single_runs=a,
            pipeline_runs=b,
            ratio=sb / sa,
            ring_overhead_ms_per_hop=hop_ms,
            same_tokens=same,
            new_tokens=new_tokens,
        )
    finally:
        for p in (w1, w2):
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-pipeline", action="store_true", help="only the transfer and per-hop tables")
    ap.add_argument("--pipeline-tokens", type=int, default=64)
    ap.add_argument("--pipeline-repeats", type=int, default=3)
    ap.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sink:
        serve_sink(0)
        return
    rows, hop = transfer_table(args.tokens, args.repeats)
    print(f"{'tokens':>7} {'dtype':>9} {'compr':>6} {'MiB':>8} {'wire MiB':>9} {'ms':>8} {'MB/s':>8}")
    for r in rows:
        print(
            f"{r['tokens']:>7} {r['dtype']:>9} {r['compression']:>6} {r['bytes'] / 2**20:>8.3f} "
            f"{r['wire_bytes'] / 2**20:>9.3f} {r['ms']:>8.2f} {r['mb_s']:>8.1f}"
        )
    print(f"per hop: ping {hop['ping_ms']:.3f} ms, 1-token decode step {hop['decode_step_ms']:.3f} ms (round trip)")
    result = dict(transfer=rows, per_hop=hop)
    if not args.skip_pipeline:
        p = pipeline_decode(args.pipeline_tokens, args.pipeline_repeats)
        result["pipeline"] = p
        print(
            f"decode, one stream: single process {p['single_tok_s']:.1f} tok/s, two stages as a ring "
            f"{p['pipeline_tok_s']:.1f} tok/s, ratio {p['ratio']:.2f}, same tokens: {p['same_tokens']}"
        )
        print(f"ring overhead per hop of a decode step: {p['ring_overhead_ms_per_hop']:.3f} ms")
    out = ROOT / "bench" / "results" / "comm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
