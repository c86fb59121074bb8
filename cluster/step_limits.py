"""The budget of one pipeline step: what a stage accepts from its plan, checked before
anything is decoded or allocated (tensor_wire.decode_step runs it first)."""

from __future__ import annotations

from dataclasses import dataclass

from proto import stage_pb2

from .tensor_wire import MAX_POSITION_AXES, WireError


@dataclass(frozen=True, slots=True)
class StepLimits:
    """What one stage accepts in one step, from its plan: the model's hidden width and
    context, the KV pool the master sized, and the master's batch limits. A legitimate
    master never exceeds them (its scheduler and block manager keep the same bounds), so a
    step over any of them is refused before anything is allocated for it."""

    hidden_size: int
    num_blocks: int
    block_size: int
    max_position: int  # rotary table length: the model's longest context
    max_seqs: int  # sequences per step (the master's --max-batch)
    max_tokens: int  # new tokens per step (the master's --max-batch-tokens)
    # Context tokens over a step's sequences: this bounds the attention work (sequences x
    # context). Without prefix caching each sequence holds its own blocks, so the pool bounds
    # it; with it, sequences share blocks and each may reach the longest context.
    max_context_tokens: int

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def for_pool(
        cls,
        hidden_size: int,
        max_position: int,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        max_tokens: int,
        max_context_tokens: int | None = None,
    ) -> StepLimits:
        widest = max_seqs * min(max_position, num_blocks * block_size)
        budget = min(max_context_tokens or widest, widest)
        return cls(hidden_size, num_blocks, block_size, max_position, max_seqs, max_tokens, budget)

    @property
    def max_context(self) -> int:
        """One sequence's longest context: the rotary table or the whole pool, whichever is less."""
        return min(self.max_position, self.num_blocks * self.block_size)

    def max_bytes(self) -> int:
        """The most a valid step's tensors take: hidden (float32 at most), multi-axis
        positions, slots, and block tables as wide as the pool."""
        t = self.max_tokens
        return t * self.hidden_size * 4 + MAX_POSITION_AXES * t * 8 + t * 8 + self.max_seqs * self.num_blocks * 8

    def check_header(self, msg: stage_pb2.StepRequest) -> None:
        """The budget, from the message's counts and declared shapes alone (nothing decoded yet)."""
        s, t = len(msg.q_lens), sum(msg.q_lens)
        if s > self.max_seqs:
            raise WireError(f"{s} sequences in one step, over this plan's budget of {self.max_seqs}")
        if t > self.max_tokens:
            raise WireError(f"{t} new tokens in one step, over this plan's budget of {self.max_tokens}")
        if msg.block_size != self.block_size:
            raise WireError(f"block size {msg.block_size}, this stage uses {self.block_size}")
        shape = list(msg.hidden.shape)
        if len(shape) == 2 and shape[1] != self.hidden_size:
            raise WireError(f"hidden width {shape[1]}, this model's hidden size is {self.hidden_size}")
        if shape != [t, self.hidden_size]:
            raise WireError(f"hidden states {shape} for {t} new tokens of width {self.hidden_size}")
        if max(msg.ctx_lens, default=0) > self.max_context:
            raise WireError(f"a context of {max(msg.ctx_lens)} tokens, over this stage's {self.max_context}")
        if sum(msg.ctx_lens) > self.max_context_tokens:
            raise WireError(
                f"{sum(msg.ctx_lens)} context tokens in one step, over this plan's budget of {self.max_context_tokens}"
            )
        pos = list(msg.positions.shape)
        if len(pos) == 2 and not 1 <= pos[0] <= MAX_POSITION_AXES:
            raise WireError(f"positions {pos}: at most {MAX_POSITION_AXES} rotary axes")
        tables = list(msg.block_tables.shape)
        if len(tables) == 2 and tables[1] > self.num_blocks:
            raise WireError(f"block tables {tables} wider than the pool's {self.num_blocks} blocks")
