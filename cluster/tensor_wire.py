"""torch tensors ⇄ protobuf `Tensor` messages, and a whole pipeline step ⇄ `StepRequest`.

Everything a peer sends is untrusted: dtype, shape, byte length, decompressed size and the
step's bookkeeping are all checked against the receiver's own limits before anything is
allocated, and every problem is a `WireError` (never an assert, never a crash). Bytes are
raw little-endian; no pickle anywhere.
"""

from __future__ import annotations

import math
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from inference.layers.attention import AttentionMetadata, build_metadata
from proto import stage_pb2

if TYPE_CHECKING:
    from .step_limits import StepLimits

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COMPRESSIONS = ("", "zlib")
MAX_DIMS = 8  # no tensor we send has more; a longer shape is malformed, not ambitious
MAX_POSITION_AXES = 4  # multi-axis rotary (Qwen2-VL's M-RoPE) uses 3 rows of positions
_INDEX_DTYPES = (torch.int64,)  # index_copy_ and cache gathers need int64 indices
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# numpy has no bfloat16: byte swapping works on a same-width integer view instead.
_SWAP_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_LITTLE = sys.byteorder == "little"


def _prime_readonly_buffer_warning() -> None:
    """torch warns (once per process, from C++) that a tensor over a read-only buffer could
    be written through. from_proto does that on purpose, over bytes no one else holds, so
    spend the one warning here, silenced, instead of on the first step a stage receives."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0", dtype=torch.uint8)


_prime_readonly_buffer_warning()


class WireError(ValueError):
    """A message from a peer (or about to be sent to one) is malformed or over a limit."""


def to_proto(t: torch.Tensor, compression: str = "") -> stage_pb2.Tensor:
    """Serialize a tensor (any device, any strides) as raw little-endian bytes."""
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot go on the wire (supported: {', '.join(DTYPES)})")
    if compression not in COMPRESSIONS:
        raise WireError(f"unknown compression {compression!r} (supported: {COMPRESSIONS})")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if not _LITTLE and flat.element_size() > 1:
        flat = torch.from_numpy(flat.view(_SWAP_VIEW[flat.element_size()]).numpy().byteswap())
    # A uint8 view gives numpy a dtype it knows (bfloat16 included) without converting.
    raw = flat.view(torch.uint8).numpy().tobytes()
    if compression == "zlib":
        raw = zlib.compress(raw, 1)  # level 1: hidden states barely compress; stay cheap
    return stage_pb2.Tensor(dtype=name, shape=list(t.shape), data=raw, compression=compression)


def _inflate(data: bytes, expected: int) -> bytes:
    """Decompress to exactly `expected` bytes, never producing more (a zip bomb stops here)."""
    d = zlib.decompressobj()
    try:
        # max_length=0 would mean "unlimited", so ask for at least one byte.
        out = d.decompress(data, max(expected, 1))
    except zlib.error as e:
        raise WireError(f"corrupt zlib data: {e}") from None
    if d.unconsumed_tail:
        raise WireError(f"zlib data inflates to {len(out)} or more bytes, shape says {expected}")
    if not d.eof:
        raise WireError("zlib stream is truncated")
    if d.unused_data:
        raise WireError("zlib stream has trailing bytes")
    if len(out) != expected:
        raise WireError(f"zlib data inflates to {len(out)} bytes, shape says {expected}")
    return out


def from_proto(msg: stage_pb2.Tensor, max_bytes: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Validate and decode a `Tensor` message; raises WireError on anything malformed or if
    the tensor would exceed `max_bytes`. On CPU the result shares memory with the `bytes`
    read from the message (upb, protobuf's default backend, hands out a fresh copy per read)."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"unknown dtype {msg.dtype!r} (supported: {', '.join(DTYPES)})")
    if msg.compression not in COMPRESSIONS:
        raise WireError(f"unknown compression {msg.compression!r} (supported: {COMPRESSIONS})")
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS:
        raise WireError(f"tensor has {len(shape)} dimensions (limit {MAX_DIMS})")
    if any(s < 0 for s in shape):
        raise WireError(f"negative dimension in shape {shape}")
    itemsize = dtype.itemsize
    nbytes = math.prod(shape) * itemsize  # Python ints: a huge shape cannot overflow
    if nbytes > max_bytes:
        raise WireError(f"tensor {shape} {msg.dtype} needs {nbytes} bytes, over the limit of {max_bytes}")
    data = msg.data  # each access copies out of the message: read it once
    if msg.compression == "zlib":
        # Incompressible data grows a little under deflate; anything beyond that is junk.
        if len(data) > nbytes + (nbytes >> 10) + 64:
            raise WireError(f"{len(data)} compressed bytes for a {nbytes}-byte tensor")
        data = _inflate(data, nbytes)
    elif len(data) != nbytes:
        raise WireError(f"tensor {shape} {msg.dtype} needs {nbytes} bytes, got {len(data)}")
    if nbytes == 0:  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype, device=device)
    # The bytes are read-only but ours alone, so sharing them is safe and saves a copy per hop.
    t = torch.frombuffer(data, dtype=dtype).view(shape)
    if not _LITTLE and itemsize > 1:
        t = torch.from_numpy(t.view(_SWAP_VIEW[itemsize]).numpy().byteswap()).view(dtype)
    return t.to(device)


@dataclass(slots=True)
class WireStep:
    """One pipeline step as it travels between stages, laid out decodes-first.

    Invariants (checked in __post_init__, so a decoded step is always consistent):
    T = hidden rows = len(positions[-1]) = len(slot_mapping) = sum(q_lens);
    S = len(q_lens) = len(ctx_lens) = block_tables rows; 1 <= q_lens[i] <= ctx_lens[i];
    the first num_decodes sequences have q_len 1; every sequence's context fits in its
    block-table row; indices are non-negative int64."""

    step_id: int
    hidden: torch.Tensor  # [T, H] float
    positions: torch.Tensor  # [T] (or [k, T] for multi-axis rotary) int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int64, zero-padded
    q_lens: list[int]
    ctx_lens: list[int]
    num_decodes: int
    block_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.step_id < 2**64:
            raise WireError(f"step_id {self.step_id} is not a uint64")
        if self.block_size <= 0:
            raise WireError(f"block_size must be positive, got {self.block_size}")
        if self.hidden.dim() != 2 or self.hidden.dtype not in _FLOAT_DTYPES:
            raise WireError(f"hidden must be a 2-D float tensor, got {tuple(self.hidden.shape)} {self.hidden.dtype}")
        for name in ("positions", "slot_mapping", "block_tables"):
            if getattr(self, name).dtype not in _INDEX_DTYPES:
                raise WireError(f"{name} must be int64, got {getattr(self, name).dtype}")
        t, s = self.hidden.shape[0], len(self.q_lens)
        if self.positions.dim() not in (1, 2) or self.positions.shape[-1] != t:
            raise WireError(f"positions {tuple(self.positions.shape)} do not match {t} hidden rows")
        if self.slot_mapping.dim() != 1 or self.slot_mapping.shape[0] != t:
            raise WireError(f"slot_mapping {tuple(self.slot_mapping.shape)} does not match {t} hidden rows")
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != s or len(self.ctx_lens) != s:
            raise WireError(
                f"{s} q_lens, {len(self.ctx_lens)} ctx_lens and block_tables "
                f"{tuple(self.block_tables.shape)} disagree on the number of sequences"
            )
        if sum(self.q_lens) != t:
            raise WireError(f"q_lens sum to {sum(self.q_lens)} but there are {t} hidden rows")
        width = self.block_tables.shape[1]
        for i, (q, ctx) in enumerate(zip(self.q_lens, self.ctx_lens)):
            if not 1 <= q <= ctx:
                raise WireError(f"sequence {i}: need 1 <= q_len ({q}) <= ctx_len ({ctx})")
            if -(-ctx // self.block_size) > width:
                raise WireError(f"sequence {i}: ctx_len {ctx} needs more than {width} blocks of {self.block_size}")
        if not 0 <= self.num_decodes <= s:
            raise WireError(f"num_decodes {self.num_decodes} outside [0, {s}]")
        if any(q != 1 for q in self.q_lens[: self.num_decodes]):
            raise WireError("the first num_decodes sequences must have q_len 1")
        for name in ("positions", "slot_mapping", "block_tables"):
            x = getattr(self, name)
            if x.numel() and int(x.min()) < 0:
                raise WireError(f"{name} has negative entries")

    def check_bounds(self, num_blocks: int, max_position: int | None = None) -> None:
        """Check indices against the receiving stage's cache (and rotary table): an
        out-of-range index is an IndexError on CPU but a device-side assert on CUDA."""
        if self.block_tables.numel() and int(self.block_tables.max()) >= num_blocks:
            raise WireError(f"block_tables reference block {int(self.block_tables.max())} of {num_blocks}")
        if self.slot_mapping.numel() and int(self.slot_mapping.max()) >= num_blocks * self.block_size:
            raise WireError(
                f"slot_mapping references slot {int(self.slot_mapping.max())} of {num_blocks * self.block_size}"
            )
        if max_position is not None and self.positions.numel() and int(self.positions.max()) >= max_position:
            raise WireError(f"position {int(self.positions.max())} beyond the model's {max_position}")

    def to(self, device: str | torch.device) -> WireStep:
        """The same step with its tensors on `device` (validate on CPU first, then move)."""
        return WireStep(
            self.step_id,
            self.hidden.to(device),
            self.positions.to(device),
            self.slot_mapping.to(device),
            self.block_tables.to(device),
            self.q_lens,
            self.ctx_lens,
            self.num_decodes,
            self.block_size,
        )

    def attention_metadata(self) -> AttentionMetadata:
        """The metadata the stage's attention layers need, built as ModelRunner.prepare does."""
        return build_metadata(
            self.slot_mapping, self.block_tables, self.q_lens, self.ctx_lens, self.num_decodes, self.block_size
        )


def encode_step(
    step_id: int,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    q_lens: list[int],
    ctx_lens: list[int],
    num_decodes: int,
    block_size: int,
    compression: str = "",
) -> stage_pb2.StepRequest:
    """Validate a step (the same checks the receiver runs, so bugs surface at the sender)
    and pack it; `compression` applies to the hidden states only."""
    step = WireStep(
        step_id, hidden, positions, slot_mapping, block_tables, list(q_lens), list(ctx_lens), num_decodes, block_size
    )
    try:
        return stage_pb2.StepRequest(
            step_id=step.step_id,
            hidden=to_proto(step.hidden, compression),
            positions=to_proto(step.positions),
            slot_mapping=to_proto(step.slot_mapping),
            block_tables=to_proto(step.block_tables),
            q_lens=step.q_lens,
            ctx_lens=step.ctx_lens,
            num_decodes=step.num_decodes,
            block_size=step.block_size,
        )
    except WireError:
        raise
    except (ValueError, TypeError) as e:  # e.g. a length beyond int32
        raise WireError(f"step {step_id} does not fit the wire format: {e}") from None


def decode_step(
    msg: stage_pb2.StepRequest,
    max_bytes: int,
    device: str | torch.device = "cpu",
    num_blocks: int | None = None,
    max_position: int | None = None,
    limits: StepLimits | None = None,
) -> WireStep:
    """Unpack and validate a step; `max_bytes` bounds all its tensors together. Pass the
    stage's `limits` (or at least `num_blocks` and rotary `max_position`) to check the
    step's width and budget before decoding and bounds-check indices before they reach a
    device. Tensors are validated on CPU, then moved to `device`."""
    if msg.ping:
        raise WireError("a ping carries no step")
    if limits is not None:
        limits.check_header(msg)
        max_bytes = min(max_bytes, limits.max_bytes())
        num_blocks, max_position = limits.num_blocks, limits.max_position
    budget = max_bytes
    tensors = {}
    for name in ("hidden", "positions", "slot_mapping", "block_tables"):
        if not msg.HasField(name):
            raise WireError(f"step {msg.step_id} has no {name}")
        tensors[name] = from_proto(getattr(msg, name), budget)
        budget -= tensors[name].numel() * tensors[name].element_size()
    step = WireStep(
        msg.step_id,
        tensors["hidden"],
        tensors["positions"],
        tensors["slot_mapping"],
        tensors["block_tables"],
        list(msg.q_lens),
        list(msg.ctx_lens),
        msg.num_decodes,
        msg.block_size,
    )
    if num_blocks is not None:
        step.check_bounds(num_blocks, max_position)
    return step if torch.device(device).type == "cpu" else step.to(device)
