"""Builds an MLX stage model for a layer range and fills it from the same sources the torch
loader reads (a local HF dir, a .gguf file, a hub id, `smollm2`), through the same code:
`resolve_model` (a GGUF is dequantized once into the safetensors cache), `read_config`, and
`map_name`, which picks exactly the tensors of the range. Only those are read; each goes
torch -> numpy -> MLX once, then q/k/v and gate/up rows are concatenated (model.MERGED).

Quantization (`--quant int8|int4`) uses MLX's own quantized layers (affine: a scale and a
bias per group of input columns), filled by quant.py. An MLX-format quantized checkpoint (an
`mlx-community/...-4bit` repo: HF names plus `.scales`/`.biases`, and a `quantization` entry
in config.json) loads as it is: those modules are made quantized before its tensors go in."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from safetensors import safe_open

from ..config import LayerRange, ModelConfig
from ..errors import InvalidParameter, UnsupportedModel
from ..loader import LoadedModel, _weight_files, map_name, read_config, resolve_quant
from ..model_source import resolve_model
from .adapter import load_adapter
from .convert import MX_DTYPES, to_mx
from .model import MERGED, StageModel, qwen2_config
from .quant import QUANT_BITS, quantizable, quantize_model

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(slots=True)
class MLXStage:
    """An MLX stage model and the `LoadedModel` facts the engine and stage server read
    (config, path, layer range, quant). `loaded.model` is not a torch model here: nothing
    reads it when a runner is passed in, which is the only way an MLX stage is used."""

    model: StageModel
    loaded: LoadedModel
    dtype: str


def _quant_of(raw: dict[str, Any]) -> tuple[int, int] | None:
    """(bits, group size) of an MLX-format quantized checkpoint, else None."""
    q = raw.get("quantization") or raw.get("quantization_config")
    if isinstance(q, dict) and "bits" in q and "group_size" in q:
        return int(q["bits"]), int(q["group_size"])
    return None


def _merge(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint projections -> our merged parameters (rows concatenated; for a quantized
    checkpoint `.scales`/`.biases` are per output row, so they concatenate alike)."""
    out: dict[str, mx.array] = {}
    groups: dict[str, dict[str, mx.array]] = {}
    for name, w in weights.items():
        for ours, parts in MERGED.items():
            hit = next((p for p in parts if f".{p}." in name), None)
            if hit is not None:
                groups.setdefault(name.replace(f".{hit}.", f".{ours}."), {})[hit] = w
                break
        else:
            out[name] = w
    for name, got in groups.items():
        ours = next(o for o in MERGED if f".{o}." in name)
        missing = [p for p in MERGED[ours] if p not in got]
        if missing:
            raise UnsupportedModel(f"checkpoint is missing {', '.join(missing)} for {name}")
        out[name] = mx.concatenate([got[p] for p in MERGED[ours]], axis=0)
    return out


def _targets(name: str, rng: LayerRange, cfg: ModelConfig) -> list[str]:
    """Our names for a checkpoint tensor: `map_name`'s, and for the `.scales`/`.biases` of a
    quantized embedding or head (map_name knows their `.weight` only) the same with that suffix."""
    for suffix in (".scales", ".biases"):
        if name.endswith(suffix) and not name.startswith("model.layers."):
            base = map_name(name[: -len(suffix)] + ".weight", rng, cfg, {})
            return [t.removesuffix(".weight") + suffix for t, _ in base]
    return [t for t, _ in map_name(name, rng, cfg, {})]


def _read(path: Path, rng: LayerRange, cfg: ModelConfig, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The range's tensors, under our (stage-relative) names; floats cast to `dtype`."""
    weights: dict[str, mx.array] = {}
    plan: dict[Path, list[str]] = {}
    for name, file in _weight_files(path).items():
        if _targets(name, rng, cfg):
            plan.setdefault(file, []).append(name)
    for file, names in plan.items():
        with safe_open(str(file), framework="pt") as sf:
            for name in names:
                t = sf.get_tensor(name)
                a = to_mx(t, dtype if t.is_floating_point() else None)
                for target in _targets(name, rng, cfg):
                    weights[target] = a
    return _merge(weights)


def load_stage(
    source: str,
    dtype: str = "float32",
    layers: tuple[int, int] | LayerRange | None = None,
    quant: str = "none",
    adapter: str | None = None,
) -> MLXStage:
    """Build and fill the MLX model for `layers` of `source`; `quant` is "none", "int8",
    "int4" or "auto" (a GGUF source keeps its precision, as on torch); `adapter` a LoRA
    adapter folder (inference.mlx.lora writes one) whose part for these layers is applied."""
    path = resolve_model(source)
    cfg = qwen2_config(read_config(path))
    if cfg.architecture not in ARCHITECTURES:
        raise UnsupportedModel(
            f"architecture {cfg.architecture!r} has no MLX implementation; supported: {', '.join(ARCHITECTURES)}"
        )
    rng = layers if isinstance(layers, LayerRange) else LayerRange(*(layers or (0, cfg.num_layers)), cfg.num_layers)
    if dtype not in MX_DTYPES:
        raise InvalidParameter("dtype", f"{dtype!r} is not one of {', '.join(MX_DTYPES)}")
    kind = resolve_quant(quant, source, "cpu")
    if kind not in ("none", *QUANT_BITS):
        raise InvalidParameter("quant", f"{kind!r} is not one of none, {', '.join(QUANT_BITS)}")
    raw = json.loads((path / "config.json").read_text())
    model = StageModel(cfg, rng)
    weights = _read(path, rng, cfg, MX_DTYPES[dtype])
    stored = _quant_of(raw)
    if stored is not None:  # an MLX-format quantized checkpoint: quantize the same modules first
        bits, group = stored
        nn.quantize(model, group, bits, class_predicate=quantizable(group, set(weights)))
        kind = "int4" if bits <= 4 else "int8"
    model.load_weights(list(weights.items()), strict=True)
    if stored is None and kind != "none":
        quantize_model(model, kind)
    if adapter:
        load_adapter(adapter, model, rng)
    model.eval()
    mx.eval(model.parameters())
    log.info(
        "MLX layers [%d, %d): %s, weights %s%s", rng.start, rng.end, dtype, kind, f", adapter {adapter}" * bool(adapter)
    )
    # The engine and the stage server read config/path/layers/quant; no torch model exists.
    loaded = LoadedModel(cast(Any, None), cfg, path, rng, kind)
    return MLXStage(model, loaded, dtype)
