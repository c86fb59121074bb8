"""lm-evaluation-harness through the server against lm-eval's own transformers backend.

    python bench/lmeval/compare.py --lm-eval /path/to/venv/bin/lm_eval [--task ringllm_tiny_mc]

lm-eval is not a dependency of the project (it pulls in datasets, evaluate, ...): install it
anywhere, e.g. `python -m venv /tmp/lme && /tmp/lme/bin/pip install "lm-eval[api]" torch==2.13.0`,
and pass its `lm_eval`. This script starts `app.py` on a free loopback port (float weights:
`--quant none`), runs the task with `local-completions` (token-id prompts, echo, logprobs: the
prompt-scoring path of /v1/completions), then with `hf` on the same converted weights, and
compares accuracy and every loglikelihood. The default task, bench/lmeval/tiny_mc.yaml, is
20 multiple-choice questions read from a local file (no dataset download). Prints a table;
writes bench/results/lm_eval.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from inference.model_source import resolve_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "app.py", "--port", str(port), "--no-ui", "--quant", "none", "--kv-cache-gb", "0.25"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        try:
            with urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not get ready; see {log}")


def run_lm_eval(lm_eval: str, task: str, model: str, model_args: str, out: Path) -> tuple[dict, list[list[float]]]:
    """(the task's metrics, each document's loglikelihood per choice)."""
    cmd = [lm_eval, "--model", model, "--model_args", model_args, "--tasks", task, "--batch_size", "1"]
    cmd += ["--include_path", "bench/lmeval", "--output_path", str(out), "--log_samples"]
    if model == "hf":
        cmd += ["--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads(Path(sorted(glob.glob(f"{out}/**/results_*.json", recursive=True))[-1]).read_text())
    samples = [json.loads(line) for line in open(sorted(glob.glob(f"{out}/**/samples_*.jsonl", recursive=True))[-1])]
    samples.sort(key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return results["results"][task], lls


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-eval", required=True, help="the lm_eval executable of an environment that has lm-eval[api]")
    p.add_argument("--task", default="ringllm_tiny_mc")
    p.add_argument("--work", default="/tmp/ringllm-lm-eval", help="where lm-eval writes its outputs")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = resolve_model("smollm2")  # the converted float32 checkpoint the server loads
    port = free_port()
    server = start_server(port, work / "server.log")
    try:
        t0 = time.perf_counter()
        url = f"http://127.0.0.1:{port}/v1/completions"
        served = run_lm_eval(
            args.lm_eval,
            args.task,
            "local-completions",
            f"base_url={url},model=smollm2,tokenizer_backend=huggingface,tokenizer={weights},max_retries=1",
            work / "server",
        )
        t_server = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
    t0 = time.perf_counter()
    hf = run_lm_eval(args.lm_eval, args.task, "hf", f"pretrained={weights},dtype=float32", work / "hf")
    t_hf = time.perf_counter() - t0
    diffs = [abs(a - b) for da, db in zip(served[1], hf[1]) for a, b in zip(da, db)]
    rows = [("server (local-completions)", served[0], t_server), ("transformers (hf)", hf[0], t_hf)]
    print(f"{'backend':28} {'acc':>6} {'acc_norm':>9} {'seconds':>8}")
    for name, m, t in rows:
        print(f"{name:28} {m['acc,none']:6.3f} {m['acc_norm,none']:9.3f} {t:8.1f}")
    print(f"{len(diffs)} loglikelihoods, max |server - hf| = {max(diffs):.2e}")
    out = {
        "task": args.task,
        "machine": cpu_name(),
        "server": {"acc": served[0]["acc,none"], "acc_norm": served[0]["acc_norm,none"], "seconds": t_server},
        "hf": {"acc": hf[0]["acc,none"], "acc_norm": hf[0]["acc_norm,none"], "seconds": t_hf},
        "loglikelihoods": len(diffs),
        "max_abs_diff": max(diffs),
    }
    (ROOT / "bench" / "results" / "lm_eval.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0 if served[0]["acc,none"] == hf[0]["acc,none"] and max(diffs) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
