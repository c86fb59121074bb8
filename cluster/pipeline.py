"""Master side of pipeline parallelism: the `Runner` the Engine uses when workers hold the
decoder layers.

The master keeps the embedding, the final norm and the LM head (a local ModelRunner whose
decoder layers, if any, are not used here); each step's embedded hidden states go round the
ring — stage 1 → … → stage N → the master's result endpoint — and come back as the last
layer's output, which the master turns into logits (N+1 hops a step)."""

from __future__ import annotations

import logging

import torch

from inference.model_runner import ModelRunner
from inference.runner import StepInputs
from inference.scheduler import ScheduledSeq

from .ring import RingClient
from .tensor_wire import encode_step

log = logging.getLogger(__name__)


class PipelineRunner:
    """Invariant: `local` holds the embedding and the head (its decoder layers, if any, are
    not used: a master that served alone keeps them to take its layers back later); the
    stages behind `ring` cover every decoder layer once, in order, each with a KV pool of
    the engine's block count."""

    def __init__(self, local: ModelRunner, ring: RingClient, compression: str = ""):
        if not (local.layers.embed and local.layers.head):
            raise ValueError("the pipeline master must hold the embedding and the head")
        self.local = local
        self.ring = ring
        self.compression = compression

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        return self.local.prepare(batch)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        # The vision tower runs here, with the embedding: stages get hidden states and [3, T] positions.
        embedded = self.local.embed_inputs(inputs) if inputs.images else self.local.embed(inputs.token_ids)
        meta = inputs.meta
        req = encode_step(
            0,
            embedded.cpu(),
            inputs.positions.cpu(),
            meta.slot_mapping.cpu(),
            meta.block_tables.cpu(),
            meta.q_lens,
            meta.ctx_lens,
            meta.num_decodes,
            meta.block_size,
            self.compression,
        )
        # The ring numbers the step and checks the answer's shape; StageError on failure or timeout.
        hidden = self.ring.step(req)
        return hidden.to(embedded.device, embedded.dtype)

    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        return self.local.logits(inputs, hidden)

    def close(self) -> None:
        """Close the stage channel; the local runner stays with its owner."""
        self.ring.close()
        log.info("closed the stage channel of the replaced pipeline (first stage %s)", self.ring.address)
