"""The Runner protocol: what the Engine and a pipeline stage call to run one step.

Every way of running decoder layers implements it — `ModelRunner` (this process),
`TPRunner` (a tensor-parallel group, rank 0's end), `PipelineRunner` (the master's end of
the ring), and later CUDA-graph, MLX and vision runners — so the Engine, the stage servicer
and the cluster manager never ask which kind they hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .layers.attention import AttentionMetadata
from .multimodal import ImageChunk
from .scheduler import ScheduledSeq


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """Rows of one step whose logits score a sequence's own prompt (requests with
    `prompt_logprobs`): flat rows `row .. row + count - 1` hold positions `position ..
    position + count - 1`, whose logits predict prompt tokens `position + 1 ..`."""

    batch_idx: int  # the sequence's index in the scheduler's batch
    row: int
    position: int
    count: int


@dataclass(slots=True)
class StepInputs:
    """A step laid out for the model: sequences reordered decodes-first."""

    order: list[int]  # order[j] = index in the scheduler's batch of the j-th laid-out sequence
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T], or [3, T] (M-RoPE) when a sequence of the step has images
    meta: AttentionMetadata
    sample_rows: list[int]  # flat row of the last token of each sequence that needs a sample
    sample_batch_idx: list[int]  # those sequences' indices in the scheduler's batch
    prompt_spans: list[PromptSpan] = field(default_factory=list)  # prompt rows to score
    images: list[ImageChunk] = field(default_factory=list)  # rows whose embeddings images replace


class Runner(Protocol):
    """One step is `prepare` → `forward` → `logits` (the last only where the runner holds the
    LM head and some sequence needs a sample). Calls come from one thread at a time (the
    model thread, or a stage's step lock). `close` releases what the runner holds outside
    this process's memory (connections, rank processes); it is called once, when the
    engine or stage stops using the runner, and a runner with nothing to release makes it a
    no-op and stays usable."""

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        """Lay out the scheduler's batch as tensors (positions, cache slots, block tables)."""
        ...

    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run the held layers on token ids (where the runner embeds) or on `hidden`; returns
        the output hidden states [T, H] in `inputs.order`."""
        ...

    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] of the rows in `inputs.sample_rows`."""
        ...

    def close(self) -> None: ...
