"""Master side of pipeline parallelism: a drop-in for ModelRunner in the Engine.

The master keeps the embedding, the final norm and the LM head (a local ModelRunner with
no decoder layers); each step's embedded hidden states go to the first stage, hop through
the others, and come back as the last layer's output, which the master turns into logits.
With a `RingClient` the last stage sends that output straight to the master (N+1 hops a
step); with a `StageClient` it travels back up through every stage (chain, 2N hops)."""
from __future__ import annotations

import itertools
import logging

import torch

from inference.model_runner import ModelRunner, StepInputs

from .ring import RingClient
from .stage_client import MAX_STEP_BYTES, StageClient
from .tensor_wire import encode_step, from_proto

log = logging.getLogger(__name__)


class PipelineRunner:
    """Invariant: `local` holds the embedding and the head (its decoder layers, if any, are
    not used: a master that served alone keeps them to take its layers back later); the
    stages behind `first` cover every decoder layer once, in order, each with a KV pool of
    the engine's block count."""

    def __init__(self, local: ModelRunner, first: StageClient | RingClient, compression: str = ""):
        if not (local.layers.embed and local.layers.head):
            raise ValueError("the pipeline master must hold the embedding and the head")
        self.local = local
        self.first = first
        self.compression = compression
        self._step_ids = itertools.count(1)

    def prepare(self, batch) -> StepInputs:
        return self.local.prepare(batch)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        embedded = self.local.model.model.embed_tokens(inputs.token_ids)
        meta = inputs.meta
        req = encode_step(next(self._step_ids), embedded.cpu(), inputs.positions.cpu(), meta.slot_mapping.cpu(),
                          meta.block_tables.cpu(), meta.q_lens, meta.ctx_lens, meta.num_decodes,
                          meta.block_size, self.compression)
        resp = self.first.step(req)  # raises StageError on failure or timeout
        return from_proto(resp.hidden, MAX_STEP_BYTES, embedded.device).to(embedded.dtype)

    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        return self.local.logits(inputs, hidden)

    def close(self) -> None:
        self.first.close()
