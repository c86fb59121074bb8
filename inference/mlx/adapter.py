"""LoRA adapters for the MLX stage model: the low-rank layer, and an adapter on disk.

An adapter is a folder with `adapter_config.json` (rank, alpha, which projections) and
`adapters.safetensors`, whose tensors are named by *global* layer index
(`model.layers.12.self_attn.qkv_proj.lora_a`), so a pipeline stage holding layers [a, b)
loads exactly its part. It wraps our merged projections (qkv_proj, gate_up_proj): one
low-rank update per merged matrix, the same count of matmuls as the base. Own code rather
than mlx-lm's tuner: ours are stage-relative modules with merged names, and the adapter
must split by layer range."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import LayerRange
from ..errors import InvalidParameter, ModelNotFound
from .model import StageModel

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapters.safetensors"
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("qkv_proj", "o_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidParameter("rank", "must be >= 1")
        if not self.alpha > 0:
            raise InvalidParameter("alpha", "must be > 0")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise InvalidParameter("targets", f"{bad or 'none'}: choose from {', '.join(TARGETS)}")


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * x @ A @ B. B starts at zero, so a fresh adapter changes
    nothing; the base (float or quantized) stays frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):  # packed: 32 / bits weights per uint32
            in_dims = in_dims * 32 // base.bits
        self.base = base
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + self.scale * ((x @ self.lora_a) @ self.lora_b).astype(x.dtype)


def apply_lora(model: StageModel, cfg: AdapterConfig) -> None:
    """Wrap the target projections of every layer and make only the LoRA matrices trainable."""
    model.freeze()
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in cfg.targets:
                if name in block:
                    lora = LoRALinear(block[name], cfg.rank, cfg.alpha)
                    lora.base.freeze()
                    setattr(block, name, lora)


def _flat(model: nn.Module) -> list[tuple[str, mx.array]]:
    """(dotted name, array) of every parameter (tree_flatten's union return type, pinned down)."""
    return cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))


def lora_weights(model: StageModel) -> dict[str, mx.array]:
    """The adapter's tensors under global layer names."""
    start = model.rng.start
    out = {}
    for name, a in _flat(model):
        if m := _LAYER.match(name):
            if ".lora_" in name:
                out[f"model.layers.{int(m.group(1)) + start}.{m.group(2)}"] = a
    return out


def save_adapter(path: str | Path, model: StageModel, cfg: AdapterConfig) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / WEIGHTS_FILE), lora_weights(model))
    (out / CONFIG_FILE).write_text(json.dumps(dict(asdict(cfg), targets=list(cfg.targets)), indent=2))
    return out


def load_adapter(path: str | Path, model: StageModel, rng: LayerRange) -> AdapterConfig:
    """Wrap `model` (a stage of `rng`) and fill its LoRA matrices with the adapter's part for
    those layers; ModelNotFound / InvalidParameter for a missing or mismatched adapter."""
    folder = Path(path).expanduser()
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
        cfg = AdapterConfig(int(raw["rank"]), float(raw["alpha"]), tuple(raw["targets"]))
        stored = mx.load(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelNotFound(f"adapter {path}: unreadable ({type(e).__name__}: {e})") from None
    assert isinstance(stored, dict)
    apply_lora(model, cfg)
    ours: list[tuple[str, mx.array]] = []
    for name, a in stored.items():
        m = _LAYER.match(name)
        if m is None:
            raise InvalidParameter("adapter", f"{name} is not a layer's LoRA matrix")
        if rng.start <= int(m.group(1)) < rng.end:
            ours.append((f"model.layers.{int(m.group(1)) - rng.start}.{m.group(2)}", a))
    want = {n for n, _ in _flat(model) if ".lora_" in n}
    if {n for n, _ in ours} != want:
        raise InvalidParameter("adapter", f"{path} does not fit this model's layers [{rng.start}, {rng.end})")
    try:
        model.load_weights(ours, strict=False)
    except ValueError as e:  # a shape from another model
        raise InvalidParameter("adapter", f"{path}: {e}") from None
    mx.eval(model.parameters())
    return cfg
