"""Linear layers whose weights may be assembled from several checkpoint tensors.

Each parameter carries a `weight_loader(param, tensor, shard_id)` so the loader only
does a name lookup (nano-vllm's packed_modules_mapping); merging Q/K/V and gate/up
happens here, at load time, not by patching modules afterwards."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        # torch.empty: the loader fills every value; random init would only cost time.
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias)

    def _rows(self, shard_id) -> slice:
        start = sum(self.output_sizes[:shard_id])
        return slice(start, start + self.output_sizes[shard_id])

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already-merged checkpoint tensor
            return super().weight_loader(param, loaded)
        target = param.data[self._rows(shard_id)]
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for shard {shard_id}: {tuple(target.shape)} vs {tuple(loaded.shape)}")
        target.copy_(loaded)


class QKVLinear(MergedLinear):
    """Q, K and V projections in one matmul; shards are named "q", "k", "v"."""

    _index = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden, [self.q_size, self.kv_size, self.kv_size], bias)

    def _rows(self, shard_id) -> slice:
        return super()._rows(self._index[shard_id])

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
