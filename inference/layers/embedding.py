from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))
        self.weight.weight_loader = default_weight_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(Linear):
    """Projects final hidden states to vocabulary logits (bias-free)."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__(hidden, vocab_size, bias=False)
