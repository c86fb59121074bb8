"""Attention over a paged KV cache held as MLX arrays, for a flat batch that mixes decodes
and (chunked) prefills — the MLX twin of inference/layers/attention.py.

Paged rather than one cache per sequence (mlx-lm's `KVCache`): a pipeline stage keeps no
per-sequence state, the master sends the cache slots and block tables with every step, so
the cache must be addressable by the master's block ids. Each layer's keys are one array
[num_blocks * block_size, KVH, D]; a step scatters its new rows by slot and gathers each
sequence's context back through its block table."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..layers.attention import AttentionMetadata
from .convert import index_to_mx


@dataclass(slots=True)
class StepLayout:
    """A step's `AttentionMetadata` as MLX arrays, converted once and shared by every layer.

    Invariants (those of AttentionMetadata): the first `num_decodes` sequences have one new
    token each and come first; `q_lens[i] <= ctx_lens[i]`; padding rows of `block_tables`
    point at block 0 and are masked out."""

    slots: mx.array  # [T] int32
    block_tables: mx.array  # [S, max_blocks] int32
    q_lens: list[int]
    ctx_lens: list[int]
    num_decodes: int
    decode_mask: mx.array | None  # [nd, 1, 1, L] bool, True = attend; None when no row is padded
    block_size: int

    @classmethod
    def from_meta(cls, meta: AttentionMetadata) -> StepLayout:
        mask = None if meta.decode_mask is None else mx.array(meta.decode_mask.numpy())
        return cls(
            index_to_mx(meta.slot_mapping),
            index_to_mx(meta.block_tables),
            list(meta.q_lens),
            list(meta.ctx_lens),
            meta.num_decodes,
            mask,
            meta.block_size,
        )


class PagedKVCache:
    """Keys and values of a stage's layers: `keys[i]`, `values[i]` are [rows, KVH, D] with
    rows = num_blocks * block_size; slot s is row s. Zero-filled at start (a padded, masked
    gather may read rows no sequence wrote)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        mx.eval(self.keys, self.values)

    def arrays(self) -> list[mx.array]:
        """Everything a step writes: evaluated with its output, so no step leaves a lazy graph behind."""
        return self.keys + self.values

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


def _context(cache: mx.array, tables: mx.array, length: int, block_size: int) -> mx.array:
    """The rows the block tables [S, nb] name, laid end to end and cut to `length`: [S, length, KVH, D]."""
    nb = -(-length // block_size)
    blocks = cache.reshape(-1, block_size, *cache.shape[1:])[tables[:, :nb]]  # [S, nb, bs, KVH, D]
    return blocks.reshape(tables.shape[0], nb * block_size, *cache.shape[1:])[:, :length]


def paged_attention(
    q: mx.array, k: mx.array, v: mx.array, layer: int, cache: PagedKVCache, step: StepLayout, scale: float
) -> mx.array:
    """q: [T, H, D], k/v: [T, KVH, D] of this step's tokens; writes k/v into the cache at
    the step's slots and returns the attention output [T, H, D]."""
    cache.keys[layer][step.slots] = k
    cache.values[layer][step.slots] = v
    kc, vc = cache.keys[layer], cache.values[layer]
    nd, bs = step.num_decodes, step.block_size
    outs = []
    if nd:  # one query per sequence against its whole context, padded to the longest
        length = max(step.ctx_lens[:nd])
        tables = step.block_tables[:nd]
        ks = _context(kc, tables, length, bs).transpose(0, 2, 1, 3)  # [nd, KVH, L, D]
        vs = _context(vc, tables, length, bs).transpose(0, 2, 1, 3)
        o = mx.fast.scaled_dot_product_attention(q[:nd, :, None], ks, vs, scale=scale, mask=step.decode_mask)
        outs.append(o[:, :, 0])
    start = nd
    for i in range(nd, len(step.q_lens)):
        n, ctx = step.q_lens[i], step.ctx_lens[i]
        qs = q[start : start + n].transpose(1, 0, 2)[None]  # [1, H, n, D]
        if ctx == n:  # a fresh prompt: its keys are exactly this step's
            ks, vs = k[start : start + n], v[start : start + n]
        else:  # a later chunk (or a cached prefix): earlier keys come from the cache
            ks = _context(kc, step.block_tables[i : i + 1], ctx, bs)[0]
            vs = _context(vc, step.block_tables[i : i + 1], ctx, bs)[0]
        # MLX's "causal" mask is aligned bottom-right: query j sees keys up to ctx - n + j.
        o = mx.fast.scaled_dot_product_attention(
            qs, ks.transpose(1, 0, 2)[None], vs.transpose(1, 0, 2)[None], scale=scale, mask="causal"
        )
        outs.append(o[0].transpose(1, 0, 2))
        start += n
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
