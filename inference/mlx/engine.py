"""`python app.py --backend mlx`: the master's Engine with every layer, the embedding and the
LM head in MLX. The engine around it is the torch one unchanged (scheduler, block tables,
sampler, detokenizer): only the runner differs, which is what makes the sampling semantics
(temperature, top-k/p, min-p, penalties, seeds, logprobs, grammars) the same by
construction; the logits cross over as one float32 [n, V] copy per step."""

from __future__ import annotations

import dataclasses
import logging
import time

from ..config import EngineConfig
from ..engine import Engine, kv_pool_blocks
from ..loader import read_config
from ..model_source import resolve_model
from .device import device_name
from .runner import MLXRunner

log = logging.getLogger(__name__)


def mlx_engine(cfg: EngineConfig, tokenizer=None) -> Engine:
    """An Engine over an MLX runner of the whole model; `cfg.quant` may be "auto". The
    engine's config says "mlx" and MLX's device ("gpu" or "cpu"), which /api/status and the
    Nodes tab show; the torch side (sampler, logits) stays on the CPU whatever it says."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, backend="mlx", device=device_name())
    mcfg = read_config(resolve_model(cfg.model))
    num_blocks = kv_pool_blocks(cfg, mcfg, mcfg.num_layers)
    runner = MLXRunner.load(cfg.model, cfg.dtype, None, num_blocks, cfg.block_size, cfg.quant, cfg.adapter)
    engine = Engine(cfg, loaded=runner.loaded, tokenizer=tokenizer, num_blocks=num_blocks, runner=runner)
    engine.load_seconds = time.perf_counter() - t0
    return engine
