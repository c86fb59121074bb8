"""One generation request as the scheduler and the engine see it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .config import SamplingParams
from .multimodal import ImageInputs

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Invariants: `num_computed_tokens <= num_tokens`; the KV of the first
    `num_computed_tokens` tokens lives in the blocks of `block_table` (in order);
    a WAITING sequence that was preempted keeps its output tokens but no blocks."""

    prompt_token_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    # The request it belongs to (the n choices of one API request share it); the scheduler
    # caps the batch slots one group holds. None: a group of its own.
    group: int | None = None
    # Prompt tokens whose KV came from the prefix cache at admission (shown to the user).
    num_cached_tokens: int = 0
    # The prompt's images (a vision model): pixels, M-RoPE positions, where image tokens go.
    images: ImageInputs | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if self.images is not None and self.images.num_prompt_tokens != len(self.prompt_token_ids):
            raise ValueError("the images' positions do not cover the prompt")

    @property
    def cache_tokens(self) -> list[int]:
        """`all_token_ids` as a prefix cache must key them: image tokens stand for their
        picture's content (see ImageInputs.cache_keys), text tokens for themselves."""
        if self.images is None:
            return self.all_token_ids
        return self.images.cache_keys + self.output_token_ids

    def cache_slice(self, start: int, end: int) -> list[int]:
        """`cache_tokens[start:end]` without building the whole list (a prompt part is a slice)."""
        prompt = self.prompt_token_ids if self.images is None else self.images.cache_keys
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_token_ids)[start:end]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
