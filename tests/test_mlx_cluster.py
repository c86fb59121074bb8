"""MLX stages in a torch cluster: hidden states cross the gRPC ring as torch bytes and are
converted at the MLX stage's edge. In process (tests/tiny_ring.py: a torch stage then an MLX
stage) and as users run it (`python app.py --workers 1` and `python -m cluster.worker
--backend mlx` as real processes): greedy tokens equal the torch engine's alone."""

from __future__ import annotations

import concurrent.futures
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]')")

from inference.config import EngineConfig, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402

from .conftest import free_port, wait_for  # noqa: E402
from .test_cluster import Proc  # noqa: E402
from .tiny_models import make_tiny  # noqa: E402
from .tiny_ring import GREEDY, tiny_ring  # noqa: E402

TOKEN = "mlx-join-token"


def test_torch_master_and_mlx_stage_equal_torch_alone(tmp_path):
    with tiny_ring(str(tmp_path), backends=("torch", "mlx")) as ring:
        got = [g[0] for g in ring.engine.generate(ring.prompts, GREEDY)]
        assert got == ring.expected
        assert ring.stages["s2"].steps_done > 0  # the MLX stage really ran them


def save_word_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer over the tiny model's vocabulary ("t0" .. "t255"), saved the way
    a real checkpoint carries one, so the real master can load the tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(str(path))


def _ready(base: str) -> dict | None:
    try:
        if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
            return httpx.get(f"{base}/api/status", timeout=2).json()
    except httpx.HTTPError:
        pass
    return None


@pytest.mark.slow
def test_real_master_with_an_mlx_worker(tmp_path):
    model = tmp_path / "model"
    make_tiny("llama-tied", model)  # a qwen2 dir would make AutoTokenizer pick Qwen2Tokenizer
    save_word_tokenizer(model)
    prompts = [" ".join(f"t{(7 * i + j) % 256}" for j in range(n)) for i, n in enumerate((4, 11, 6))]
    ref = Engine(EngineConfig(model=str(model), kv_cache_gb=0.01))
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = [text for _, text, _ in ref.generate([ref.encode(p) for p in prompts], params)]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    master = Proc(
        ["app.py", "--no-ui", "--port", str(port), "--model", str(model), "--workers", "1", "--quant", "none"]
        + ["--join-token", TOKEN, "--kv-cache-gb", "0.01", "--max-batch", "4"],
        tmp_path / "master.log",
    )
    worker = Proc(
        ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--backend", "mlx", "--node-id", "mlxw"],
        tmp_path / "worker.log",
    )
    try:
        status = wait_for(lambda: _ready(base), 120, "the cluster with an MLX worker to serve")
        node = next(n for n in status["nodes"] if n["node_id"] == "mlxw")
        assert node["backend"] == "mlx"
        assert (node["layer_start"], node["layer_end"]) == (0, 4)

        def complete(prompt: str) -> str:
            body = dict(prompt=prompt, temperature=0, max_tokens=10)
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # concurrent: batched on the MLX stage
            assert list(pool.map(complete, prompts)) == expected
    except BaseException:
        for p in (master, worker):
            sys.stderr.write(f"--- {p.log.name}\n{p.log.read_text(errors='replace')[-3000:]}\n")
        raise
    finally:
        worker.stop()
        master.stop()
