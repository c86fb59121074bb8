"""Vocabulary-parallel embedding and LM head (vLLM's VocabParallelEmbedding / ParallelLMHead).

Each rank holds a contiguous slice of ceil(V / N) vocabulary rows (the last slice padded
with zero rows, so every rank's logits have one shape for the gather). The embedding looks
up the ids in its slice, zeroes the others and all-reduces (exactly one rank contributes
each row, so the sum is exact); the LM head computes its slice of the logits and rank 0
gathers them. With TP 1 the slice is the whole vocabulary and both are plain ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, gather_last_dim, tp_rank, tp_size
from .linear import Loaded, _check, loaded_shape, read, set_weight_loader
from .quant import PackableWeight, QuantSpec


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.per_rank
        # Real (unpadded) rows of this rank's slice.
        self.num_real = max(0, min(vocab_size, self.vocab_start + self.per_rank) - self.vocab_start)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        _check("vocabulary rows", loaded_shape(loaded), (self.vocab_size, param.shape[1]))
        param.data[: self.num_real].copy_(read(loaded, 0, self.vocab_start, self.num_real))
        param.data[self.num_real :].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_real)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(h.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(PackableWeight, VocabParallelEmbedding):
    """Final hidden states -> vocabulary logits (bias-free). Full logits [n, V] come back
    on rank 0; other ranks get their own slice (which the caller ignores). With `quant` its
    weight is packed with the spec's head kernel once loaded (a tied embedding stays float)."""

    def __init__(self, vocab_size: int, hidden: int, quant: QuantSpec | None = None):
        super().__init__(vocab_size, hidden)
        self.init_packing(quant, head=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(x)
        if self.tp_size == 1:
            return logits
        full = gather_last_dim(logits)
        return logits if full is None else full[..., : self.vocab_size]
