"""Linear layers, tensor-parallel when the stage runs as a TP group (vLLM's shapes).

- `ColumnParallelLinear` / `MergedColumnParallelLinear` / `QKVParallelLinear` split the
  output dimension: each rank computes its rows (its heads, its share of the MLP), no
  communication.
- `RowParallelLinear` splits the input dimension and ends in an all-reduce: it follows a
  column-parallel layer, so each rank already holds exactly its input columns.

Each parameter carries a `weight_loader(param, loaded, shard_id)` so the loader only does a
name lookup (nano-vllm's packed_modules_mapping); merging Q/K/V and gate/up, and cutting
out this rank's shard, happen here at load time. `loaded` is a tensor or a safetensors
slice: from a slice only this rank's rows/columns are read from disk. With TP 1 every
layer is the plain matmul it always was (`gemm.dense`): no extra op on the hot path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce, kv_head_start, kv_heads_per_rank, shard_range, tp_rank, tp_size
from .gemm import dense
from .quant import PackableWeight, QuantSpec

# A torch.Tensor or a safetensors `PySafeSlice` (get_shape() and [a:b, c:d] indexing).
Loaded = Any
# (param, loaded, shard_id): copies a checkpoint tensor, or one shard of a merged one, into param.
WeightLoader = Callable[[nn.Parameter, Loaded, Any], None]


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Attach the loader that inference/loader.py looks up on `param` (vLLM's set_weight_attrs)."""
    # An attribute of our own on the Parameter, which torch's stubs do not declare.
    param.weight_loader = loader  # type: ignore[attr-defined]


def loaded_shape(loaded: Loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def read(loaded: Loaded, dim: int = 0, start: int = 0, size: int | None = None) -> torch.Tensor:
    """[start, start+size) along `dim` (everything if size is None); a safetensors slice
    reads only that range from the file."""
    if isinstance(loaded, torch.Tensor):
        return loaded if size is None else loaded.narrow(dim, start, size)
    if size is None:
        return loaded[:]
    return loaded[(slice(None),) * dim + (slice(start, start + size),)]


def default_weight_loader(param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
    if tuple(param.shape) != loaded_shape(loaded):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {loaded_shape(loaded)}")
    param.data.copy_(read(loaded))


def _check(what: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ValueError(f"shape mismatch for {what}: checkpoint {got}, expected {want}")


class MergedColumnParallelLinear(PackableWeight, nn.Module):
    """Several projections of one input stacked along the output dimension, each split
    across ranks: this rank holds its share of every part, in part order. Checkpoint
    parts arrive as shard ids 0, 1, ... (or all at once, already merged: shard_id None).
    With `quant` the weight is packed once loaded (see layers/quant.py)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, quant: QuantSpec | None = None):
        super().__init__()
        self.init_packing(quant)
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        # Per part: (first checkpoint row of this rank's share, its length).
        self.shares = [self._share(i) for i in range(len(self.output_sizes))]
        local = sum(n for _, n in self.shares)
        # torch.empty: the loader fills every value; random init would only cost time.
        self.weight = nn.Parameter(torch.empty(local, in_features))
        set_weight_loader(self.weight, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(local))
            set_weight_loader(self.bias, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def _share(self, part: int) -> tuple[int, int]:
        return shard_range(self.output_sizes[part], self.tp_rank, self.tp_size)

    def _part(self, shard_id) -> int:
        return shard_id

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        tail = tuple(param.shape[1:])
        parts = range(len(self.output_sizes)) if shard_id is None else [self._part(shard_id)]
        if shard_id is None:
            _check("merged tensor", loaded_shape(loaded), (sum(self.output_sizes), *tail))
        else:
            _check(f"shard {shard_id}", loaded_shape(loaded), (self.output_sizes[parts[0]], *tail))
        for i in parts:
            src_start, n = self.shares[i]
            if shard_id is None:  # an already-merged checkpoint tensor: skip the earlier parts
                src_start += sum(self.output_sizes[:i])
            dst_start = sum(m for _, m in self.shares[:i])
            param.data[dst_start : dst_start + n].copy_(read(loaded, 0, src_start, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return dense(x, self.weight, self.bias)
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(MergedColumnParallelLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantSpec | None = None):
        super().__init__(in_features, [out_features], bias, quant)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        super().weight_loader(param, loaded, None)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V projections in one matmul, split by heads; shards are named "q", "k",
    "v". `num_heads` / `num_kv_heads` are this rank's (what its attention runs on); KV
    heads are replicated when the TP size exceeds them (see distributed.kv_heads_per_rank)."""

    _index = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, quant: QuantSpec | None = None
    ):
        size = tp_size()
        self.head_dim = head_dim
        self.total_kv_heads = num_kv_heads
        self.num_heads = num_heads // size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, size)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias, quant)

    def _share(self, part: int) -> tuple[int, int]:
        if part == 0:
            return self.tp_rank * self.q_size, self.q_size
        return kv_head_start(self.total_kv_heads, self.tp_rank, self.tp_size) * self.head_dim, self.kv_size

    def _part(self, shard_id) -> int:
        return self._index[shard_id]

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(PackableWeight, nn.Module):
    """Input dimension split across ranks; the partial products are summed by an
    all-reduce, and the bias (held whole by every rank) is added once, after it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: QuantSpec | None = None):
        super().__init__()
        self.init_packing(quant)
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.in_start, self.in_local = shard_range(in_features, self.tp_rank, self.tp_size)
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        set_weight_loader(self.weight, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            set_weight_loader(self.bias, default_weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        _check("row-parallel weight", loaded_shape(loaded), (param.shape[0], self.in_features))
        param.data.copy_(read(loaded, 1, self.in_start, self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1 and self.packed is None:
            return dense(x, self.weight, self.bias)
        y = self.matmul(x)
        if self.tp_size > 1:
            y = all_reduce(y)
        return y if self.bias is None else y + self.bias
