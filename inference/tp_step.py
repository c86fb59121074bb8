"""How rank 0 hands each step to the other ranks of its TP group: tensor broadcasts only.

Every command starts with a fixed int64 header (`Header`): the command and the step's
sizes. A forward step then broadcasts one int64 payload — q_lens, ctx_lens, positions,
slot_mapping, block_tables (and token ids on an embedding stage), concatenated — and, on
a stage that receives hidden states, one [T, H] tensor in the model's dtype. Three
broadcasts at most per step, no objects, no pickle."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from enum import IntEnum

import torch

from .distributed import broadcast
from .layers.attention import build_metadata
from .runner import StepInputs


class Cmd(IntEnum):
    STOP = 0
    FORWARD = 1
    LOGITS = 2


@dataclass(slots=True)
class Header:
    cmd: int
    tokens: int = 0  # T: rows in the flat batch
    seqs: int = 0  # S: sequences
    width: int = 0  # block-table width
    num_decodes: int = 0
    block_size: int = 0
    hidden_dim: int = 0  # H of the broadcast hidden states; 0 = token ids in the payload
    rows: int = 0  # LOGITS: sampled rows
    axes: int = 0  # rows of multi-axis positions ([axes, T], M-RoPE); 0 = plain [T]

    LEN = 9

    def send(self, device: torch.device) -> None:
        broadcast(torch.tensor(astuple(self), dtype=torch.long, device=device))

    @classmethod
    def receive(cls, device: torch.device) -> Header:
        t = broadcast(torch.empty(cls.LEN, dtype=torch.long, device=device))
        return cls(*t.tolist())


def send_forward(inputs: StepInputs, hidden: torch.Tensor | None, device: torch.device) -> None:
    meta = inputs.meta
    seqs, width = meta.block_tables.shape
    tokens = inputs.positions.shape[-1]
    axes = inputs.positions.shape[0] if inputs.positions.dim() == 2 else 0
    parts = [
        torch.tensor(meta.q_lens + meta.ctx_lens, dtype=torch.long, device=device),
        inputs.positions.reshape(-1),
        meta.slot_mapping,
        meta.block_tables.reshape(-1),
    ]
    if hidden is None:
        parts.append(inputs.token_ids)
    payload = torch.cat([p.to(device, torch.long) for p in parts])
    Header(
        Cmd.FORWARD,
        tokens,
        seqs,
        width,
        meta.num_decodes,
        meta.block_size,
        0 if hidden is None else hidden.shape[-1],
        axes=axes,
    ).send(device)
    broadcast(payload)
    if hidden is not None:
        broadcast(hidden.to(device).contiguous())


def receive_forward(h: Header, device: torch.device, dtype: torch.dtype) -> tuple[StepInputs, torch.Tensor | None]:
    S, T = h.seqs, h.tokens
    sizes = [S, S, max(h.axes, 1) * T, T, S * h.width] + ([T] if h.hidden_dim == 0 else [])
    payload = broadcast(torch.empty(sum(sizes), dtype=torch.long, device=device))
    q_lens, ctx_lens, positions, slots, tables, *ids = payload.split(sizes)
    if h.axes:
        positions = positions.view(h.axes, T)
    hidden = None
    if h.hidden_dim:
        hidden = broadcast(torch.empty(T, h.hidden_dim, dtype=dtype, device=device))
    meta = build_metadata(
        slots, tables.view(S, h.width), q_lens.tolist(), ctx_lens.tolist(), h.num_decodes, h.block_size
    )
    token_ids = ids[0] if ids else positions  # unused where hidden states come in
    return StepInputs([], token_ids, positions, meta, [], []), hidden


def send_logits(rows: list[int], device: torch.device) -> None:
    Header(Cmd.LOGITS, rows=len(rows)).send(device)
    broadcast(torch.tensor(rows, dtype=torch.long, device=device))


def receive_logits(h: Header, device: torch.device) -> list[int]:
    return broadcast(torch.empty(h.rows, dtype=torch.long, device=device)).tolist()
