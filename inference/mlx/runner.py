"""`MLXRunner`: the `Runner` (inference/runner.py) of an MLX stage model over a paged MLX
KV cache. The Engine (scheduler, sampler, detokenizer) and the gRPC stage server drive it
exactly as they drive the torch `ModelRunner`: the step layout is the same function, and
hidden states and logits leave as torch tensors (converted here, at the edge)."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import torch

from ..config import LayerRange, ModelConfig
from ..model_runner import ModelRunner
from ..models.llama import LlamaForCausalLM
from ..runner import StepInputs
from ..scheduler import ScheduledSeq
from .attention import PagedKVCache, StepLayout
from .convert import MX_DTYPES, index_to_mx, to_mx, to_torch
from .loader import MLXStage, load_stage

log = logging.getLogger(__name__)


class MLXThread:
    """The one thread every MLX call of a runner runs on. MLX keeps its streams per thread
    (on Metal a thread that never made one cannot use the GPU), while the engine's model
    thread, the stage server's gRPC pool and asyncio.to_thread all call in from threads of
    their own; one executor gives MLX a single, fixed thread whoever calls."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mlx")

    def run(self, fn, *args: Any) -> Any:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class MLXRunner:
    """Owns an MLX stage model and the paged KV cache of its layers (`num_blocks` blocks of
    `block_size` tokens, the master's pool, so its block ids index it directly). Calls come
    from one caller thread at a time (the Runner contract); each runs on `thread`."""

    def __init__(self, stage: MLXStage, num_blocks: int, block_size: int, thread: MLXThread | None = None):
        """`stage`'s arrays must be evaluated, or made on `thread`: MLX runs a lazy array only
        on the thread whose stream made it ("There is no Stream(cpu, 0) in current thread")."""
        self.stage = stage
        self.model = stage.model
        self.cfg: ModelConfig = stage.loaded.config
        self.layers: LayerRange = stage.loaded.layers
        self.block_size = block_size
        self.dtype = MX_DTYPES[stage.dtype]
        self.thread = thread or MLXThread()
        cfg = self.cfg
        self.cache = self.thread.run(
            PagedKVCache, len(self.layers), num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype
        )
        self._last: tuple[torch.Tensor, mx.array] | None = None  # forward's output, both forms
        # The step layout (decodes first, slots, block tables, prompt spans) is the torch
        # runner's: a ModelRunner of no layers computes it. Its model holds nothing that matters
        # (an empty range needs an end: a one-row embedding; a one-row rotary table), and the
        # meta device is no cheaper: its first use imports torch's decompositions (~3 s).
        none = LayerRange(0, 0, cfg.num_layers, embed=True, head=False)
        empty = LlamaForCausalLM(dataclasses.replace(cfg, vocab_size=1, max_position=1), none)
        self._layout = ModelRunner(empty, cfg, none, 1, block_size, torch.float32, "cpu")
        log.info(
            "MLX KV cache: %d blocks of %d tokens (%.2f GiB) on %s",
            num_blocks,
            block_size,
            self.cache.nbytes / 2**30,
            mx.default_device(),
        )

    @classmethod
    def load(
        cls,
        source: str,
        dtype: str,
        layers: tuple[int, int] | LayerRange | None,
        num_blocks: int,
        block_size: int,
        quant: str = "none",
        adapter: str | None = None,
    ) -> MLXRunner:
        """Load the stage (and its part of a LoRA `adapter`) on the runner's own MLX thread
        and build the runner around it."""
        thread = MLXThread()
        stage = thread.run(load_stage, source, dtype, layers, quant, adapter)
        return cls(stage, num_blocks, block_size, thread)

    @property
    def loaded(self):
        return self.stage.loaded

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        return self._layout.prepare(batch)

    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run the held layers on token ids (where the stage embeds) or on `hidden`, given in
        `inputs.order`; returns the output hidden states [T, H] in the stage's dtype."""
        return self.thread.run(self._forward, inputs, hidden)

    def _forward(self, inputs: StepInputs, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.layers.embed:
            x = index_to_mx(inputs.token_ids)
        elif hidden is None:
            raise ValueError("this stage does not embed: it needs hidden states")
        else:
            x = to_mx(hidden, self.dtype)
        step = StepLayout.from_meta(inputs.meta)
        h = self.model(x, index_to_mx(inputs.positions), step, self.cache)
        mx.eval(h, *self.cache.arrays())  # the cache writes too: no lazy graph outlives the step
        out = to_torch(h)
        self._last = (out, h)
        return out

    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] of the rows in `inputs.sample_rows` (torch, for the sampler)."""
        return self.thread.run(self._logits, inputs, hidden)

    def _logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        last = self._last
        h = last[1] if last is not None and last[0] is hidden else to_mx(hidden, self.dtype)
        rows = mx.array(inputs.sample_rows, dtype=mx.int32)
        logits = self.model.compute_logits(h[rows]).astype(mx.float32)
        mx.eval(logits)
        return to_torch(logits)

    def close(self) -> None:
        """Nothing outside this process to release; the runner stays usable (Runner contract)."""
