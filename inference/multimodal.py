"""A prompt's images once processed, and where their tokens sit: the pure bookkeeping behind
Qwen2-VL prompts (no model, no I/O).

An image becomes `grid_t * grid_h * grid_w / merge**2` image tokens: the chat template writes
one image pad per image, `expand_image_pads` repeats it to that count, and `mrope_positions`
gives every prompt token its (temporal, height, width) rotary position (M-RoPE): text tokens
count up on all three axes; an image's tokens share a start and spread over its grid; the
text after it resumes past the image's largest axis."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .errors import InvalidParameter

Grid = tuple[int, int, int]  # (temporal, height, width) in patches


def image_token_counts(grids: list[Grid], merge: int) -> list[int]:
    return [t * h * w // merge**2 for t, h, w in grids]


def expand_image_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """Replace the k-th `pad_id` of `ids` by counts[k] copies; the pads must match the images."""
    found = sum(1 for t in ids if t == pad_id)
    if found != len(counts):
        raise InvalidParameter("messages", f"the prompt has {found} image placeholders for {len(counts)} images")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == pad_id:
            out += [pad_id] * counts[k]
            k += 1
        else:
            out.append(t)
    return out


def mrope_positions(ids: list[int], pad_id: int, grids: list[Grid], merge: int) -> tuple[torch.Tensor, int]:
    """[3, len(ids)] positions of an expanded prompt, and the delta that places later tokens:
    token p >= len(ids) sits at p + delta on every axis (transformers' get_rope_index)."""
    rows: list[torch.Tensor] = []
    pos = i = img = 0
    while i < len(ids):
        if ids[i] != pad_id:
            j = i
            while j < len(ids) and ids[j] != pad_id:
                j += 1
            rows.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        t, h, w = grids[img]
        lh, lw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij")
        rows.append(torch.stack((tt, hh, ww)).reshape(3, -1) + pos)
        i += t * lh * lw
        pos += max(lh, lw)  # as transformers: the temporal axis does not advance the text
        img += 1
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    return positions, int(positions.max()) + 1 - len(ids) if len(ids) else 0


@dataclass(slots=True, eq=False)
class ImageInputs:
    """One prompt's images as the vision tower takes them, and their place in the prompt.

    Invariants: `positions` is [3, P] for the P-token expanded prompt; `image_index[p]` is the
    row of the concatenated image tokens that prompt token p takes, -1 for text; `embeds`,
    when set, holds those rows (computed by the first prefill chunk that needs them and
    dropped once the prompt is in the KV cache; a recomputed prompt computes them again)."""

    pixel_values: torch.Tensor  # [patches, C * T * P * P] float32, in the processor's order
    grids: list[Grid]
    positions: torch.Tensor  # [3, P] int64
    delta: int
    image_index: torch.Tensor  # [P] int64
    # The prompt as a prefix cache keys it: text tokens as they are, each image token as a
    # negative number from its picture's content hash and its place in the picture, so the
    # same picture (even in a later turn) is a hit and another picture never is.
    cache_keys: list[int] = field(repr=False)
    embeds: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls, ids: list[int], pad_id: int, pixel_values: torch.Tensor, grids: list[Grid], merge: int
    ) -> ImageInputs:
        positions, delta = mrope_positions(ids, pad_id, grids, merge)
        is_image = torch.tensor(ids, dtype=torch.long) == pad_id
        index = torch.full((len(ids),), -1, dtype=torch.long)
        index[is_image] = torch.arange(int(is_image.sum()))
        pixels = pixel_values.to(torch.float32).contiguous()
        digests, start = [], 0
        for grid in grids:  # one digest per picture: its grid and its patches
            n = grid[0] * grid[1] * grid[2]
            digests.append(hashlib.sha256(repr(grid).encode() + pixels[start : start + n].numpy().tobytes()).digest())
            start += n
        keys = list(ids)
        k = 0
        for digest, count in zip(digests, image_token_counts(grids, merge)):
            base = int.from_bytes(digest[:16], "big") << 24
            for offset in range(count):
                while ids[k] != pad_id:
                    k += 1
                keys[k] = -1 - (base | offset)
                k += 1
        return cls(pixel_values, grids, positions, delta, index, keys)

    @property
    def num_prompt_tokens(self) -> int:
        return self.positions.shape[1]

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens start..end-1 (prompt or generated)."""
        p = self.num_prompt_tokens
        head = self.positions[:, start : min(end, p)]
        if end <= p:
            return head
        tail = torch.arange(max(start, p), end).add_(self.delta).expand(3, -1)
        return torch.cat((head, tail), dim=1)


@dataclass(frozen=True, slots=True)
class ImageChunk:
    """The tokens start..end-1 of a sequence with images sit at flat rows row.. of a step."""

    row: int
    start: int
    end: int
    images: ImageInputs
