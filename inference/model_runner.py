"""Runs one scheduled step of a (stage) model over the paged KV cache.

Turns the scheduler's list of (sequence, new tokens) into flat tensors — token ids or
hidden states, positions, cache slots, block tables — and calls the model."""

from __future__ import annotations

import torch

from . import kernels
from .config import LayerRange, ModelConfig
from .errors import UnsupportedModel
from .layers.attention import Attention, build_metadata
from .models.llama import LlamaForCausalLM
from .multimodal import ImageChunk, ImageInputs
from .runner import PromptSpan, StepInputs
from .scheduler import ScheduledSeq
from .sequence import Sequence


def token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """seq.all_token_ids[start:end] without copying the whole history every decode step."""
    p = seq.num_prompt_tokens
    if start >= p:
        return seq.output_token_ids[start - p : end - p]
    return (seq.prompt_token_ids + seq.output_token_ids)[start:end]


def kv_cache_dtype(dtype: torch.dtype, device: str | torch.device, quant: str) -> torch.dtype:
    """The KV cache's dtype for activations of `dtype` (the one rule behind pool sizing and
    the caches a runner allocates). Quantized weights on CPU keep float32 keys and values as
    bfloat16: a decode step of many streams reads its whole cache, and half the bytes took
    the default model's attention from ~13 to ~9 ms a step (16 streams x 130 tokens); those
    weights have already left float parity. Float weights keep their dtype (exact parity)."""
    cpu = torch.device(device).type == "cpu"
    return torch.bfloat16 if cpu and quant in ("int8", "int4") and dtype == torch.float32 else dtype


class ModelRunner:
    """The `Runner` of layers in this process: owns a stage model and the KV tensors of its
    layers (one (K, V) pair per layer)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        cfg: ModelConfig,
        layers: LayerRange,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
        quant: str = "none",
    ):
        self.model = model
        self.cfg = cfg
        self.layers = layers
        self.block_size = block_size
        self.device = torch.device(device)
        if self.device.type == "cpu":
            kernels.load()  # built once per machine; the layers fall back to torch ops without it
        # Under tensor parallelism a rank caches only its own KV heads: ask its layers.
        kv_heads = next((m.num_kv_heads for m in model.modules() if isinstance(m, Attention)), cfg.num_kv_heads)
        shape = (num_blocks, block_size, kv_heads, cfg.head_dim)
        kv_dtype = kv_cache_dtype(dtype, self.device, quant)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
            )
            for _ in range(len(layers))
        ]

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        order = sorted(range(len(batch)), key=lambda i: batch[i].num_new_tokens != 1)
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        sample_rows: list[int] = []
        sample_idx: list[int] = []
        spans: list[PromptSpan] = []
        images: list[ImageChunk] = []
        for i in order:
            item = batch[i]
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            # The last prompt position predicts the first output token: that row is a sample row.
            scored = min(end, seq.num_prompt_tokens - 1) - start
            if seq.params.prompt_logprobs is not None and scored > 0:
                spans.append(PromptSpan(i, len(tokens), start, scored))
            if seq.images is not None:
                images.append(ImageChunk(len(tokens), start, end, seq.images))
            tokens += token_slice(seq, start, end)
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            q_lens.append(item.num_new_tokens)
            ctx_lens.append(end)
            if item.needs_sample:
                sample_rows.append(len(tokens) - 1)
                sample_idx.append(i)
        width = max(len(batch[i].seq.block_table) for i in order)
        tables = [batch[i].seq.block_table + [0] * (width - len(batch[i].seq.block_table)) for i in order]
        num_decodes = sum(1 for n in q_lens if n == 1)
        dev = self.device
        meta = build_metadata(
            torch.tensor(slots, dtype=torch.long, device=dev),
            torch.tensor(tables, dtype=torch.long, device=dev),
            q_lens,
            ctx_lens,
            num_decodes,
            bs,
        )
        # A step with a picture anywhere takes M-RoPE's 3 rows; text-only steps keep 1-D positions.
        pos = self._mrope(positions, images) if images else torch.tensor(positions, dtype=torch.long, device=dev)
        return StepInputs(
            order=order,
            token_ids=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=pos,
            meta=meta,
            sample_rows=sample_rows,
            sample_batch_idx=sample_idx,
            prompt_spans=spans,
            images=images,
        )

    def _mrope(self, positions: list[int], images: list[ImageChunk]) -> torch.Tensor:
        """[3, T]: every row the 1-D positions, except where a sequence with images sits."""
        out = torch.tensor(positions, dtype=torch.long).expand(3, -1).clone()
        for c in images:
            out[:, c.row : c.row + c.end - c.start] = c.images.positions_for(c.start, c.end)
        return out.to(self.device)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage's layers: on token ids if it is the first stage, else on `hidden`
        (laid out in `inputs.order`). Returns the stage's output hidden states [T, H]."""
        x = (self.embed_inputs(inputs) if inputs.images else inputs.token_ids) if self.layers.embed else hidden
        return self.model(x, inputs.positions, inputs.meta, self.kv_caches)

    @torch.inference_mode()
    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] of the sequences needing a sample, in `sample_batch_idx` order."""
        rows = torch.tensor(inputs.sample_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The embedding alone (a pipeline master sends it to the first stage)."""
        return self.model.embed(token_ids)

    @torch.inference_mode()
    def embed_inputs(self, inputs: StepInputs) -> torch.Tensor:
        """The step's embedded tokens [T, H], image pads replaced by the vision tower's output."""
        h = self.model.embed(inputs.token_ids)
        for c in inputs.images:
            index = c.images.image_index[c.start : c.end]
            local = (index >= 0).nonzero().squeeze(1)
            if local.numel():
                h[local.to(h.device) + c.row] = self._image_embeds(c.images).index_select(0, index[local].to(h.device))
            if c.end >= c.images.num_prompt_tokens:
                c.images.embeds = None  # the prompt is in the KV cache now
        return h

    def _image_embeds(self, images: ImageInputs) -> torch.Tensor:
        if images.embeds is None:
            embed_images = getattr(self.model, "embed_images", None)
            if embed_images is None:
                raise UnsupportedModel(f"{self.cfg.architecture} has no vision")
            images.embeds = embed_images(images.pixel_values.to(self.device), images.grids)
        return images.embeds

    def close(self) -> None:
        """Nothing to release but memory: the runner stays usable, which is how a master that
        handed its layers to workers takes them back."""
