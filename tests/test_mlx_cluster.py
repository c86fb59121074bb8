"""MLX stages in a torch cluster: hidden states cross the gRPC ring as torch bytes and are
converted at the MLX stage's edge. In process (tests/tiny_ring.py: a torch stage then an MLX
stage) and as users run it on the default model (`python app.py --workers 2`, a torch worker
and `python -m cluster.worker --backend mlx`, real processes): greedy tokens equal the torch
engine's alone."""

from __future__ import annotations

import concurrent.futures

import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]')")

from .conftest import QUESTIONS, free_port  # noqa: E402
from .test_cluster import Proc, chat, healthy, status, wait_for  # noqa: E402
from .tiny_ring import GREEDY, tiny_ring  # noqa: E402

TOKEN = "mlx-join-token"


def test_torch_master_and_mlx_stage_equal_torch_alone(tmp_path):
    with tiny_ring(str(tmp_path), backends=("torch", "mlx")) as ring:
        got = [g[0] for g in ring.engine.generate(ring.prompts, GREEDY)]
        assert got == ring.expected
        assert ring.stages["s2"].steps_done > 0  # the MLX stage really ran them


@pytest.mark.slow
def test_default_model_over_a_torch_worker_and_an_mlx_worker_equals_torch_alone(tmp_path, expected):
    """The issue's mixed cluster: `python app.py --workers 2` with one torch worker and one
    `--backend mlx` worker; concurrent chats (batched on both stages) give the single torch
    process's greedy replies."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    master = Proc(
        ["app.py", "--no-ui", "--port", str(port), "--workers", "2", "--quant", "none", "--join-token", TOKEN]
        + ["--kv-cache-gb", "0.1", "--max-batch", "8"],
        tmp_path / "master.log",
    )
    workers = [
        Proc(
            ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--node-id", name, "--backend", backend],
            tmp_path / f"{name}.log",
        )
        for name, backend in (("torchw", "torch"), ("mlxw", "mlx"))
    ]
    procs = [master, *workers]
    try:
        wait_for(lambda: healthy(base), 240, "the cluster with an MLX worker to serve", procs)
        nodes = {n["node_id"]: n for n in status(base)["nodes"]}
        assert nodes["mlxw"]["backend"] == "mlx" and nodes["torchw"]["backend"] == "torch"
        assert nodes["master"]["backend"] == "torch"  # listed without the web page (--no-ui) too
        assert nodes["mlxw"]["layer_end"] > nodes["mlxw"]["layer_start"]  # it holds layers
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda q: chat(base, q), QUESTIONS[:3])) == expected[:3]
    finally:
        for p in procs:
            p.stop()
