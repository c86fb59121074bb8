"""Builds a model for a layer range and fills it from safetensors, reading only the
tensors that range needs (the other layers' weights are never materialised). Tensors are
opened as safetensors slices, so under tensor parallelism each rank's weight loaders read
only that rank's rows or columns from disk."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from . import kernels
from .config import LayerRange, ModelConfig
from .errors import InvalidParameter, ModelNotFound, UnsupportedModel
from .layers.linear import default_weight_loader
from .layers.quant import PackableWeight, choose, describe
from .model_source import DEFAULT_MODEL, resolve_model, smollm2_path
from .models.llama import LlamaForCausalLM
from .models.registry import model_class

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    path: Path  # local HF-style directory (also holds the tokenizer)
    layers: LayerRange
    quant: str = "none"  # how the weights are held: "none", "int8" or "int4" (never "auto")


# GGUF block types by the precision `--quant auto` keeps: 4-bit blocks stay int4, 5- to 8-bit int8.
_GGUF_INT4 = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS")
_GGUF_INT8 = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_K")


def gguf_file(source: str) -> Path | None:
    """The GGUF file behind a `--model` value, or None if it is not a GGUF source."""
    if source == DEFAULT_MODEL:
        return smollm2_path()
    path = Path(source).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def resolve_quant(requested: str, source: str, device: str) -> str:
    """`--quant auto`: on CPU a GGUF source keeps its own precision (4-bit blocks -> int4,
    5- to 8-bit -> int8), as llama.cpp and transformers do; anything else stays float."""
    if requested != "auto":
        return requested
    path = gguf_file(source)
    if path is None or not device.startswith("cpu"):
        return "none"
    from gguf import GGUFReader

    kinds = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if t.name.startswith("blk."))
    main = kinds.most_common(1)[0][0] if kinds else "F32"
    return "int4" if main in _GGUF_INT4 else "int8" if main in _GGUF_INT8 else "none"


def read_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFound(f"{path}: unreadable config.json ({e})") from None
    return ModelConfig.from_hf(raw)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _weight_files(path: Path) -> dict[str, Path]:
    """checkpoint tensor name -> file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"{path}: no *.safetensors weights")
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(dict.fromkeys(sf.keys(), f))
    return names


def map_name(name: str, rng: LayerRange, cfg: ModelConfig, packed: dict) -> list[tuple[str, object]]:
    """Our (parameter name, shard id) targets for one checkpoint tensor; [] = not ours."""
    if m := _LAYER.match(name):
        layer = int(m.group(1))
        if not rng.start <= layer < rng.end:
            return []
        rest = m.group(2)
        for ckpt, (ours, shard) in packed.items():
            if f".{ckpt}." in f".{rest}":
                return [(f"model.layers.{layer - rng.start}.{rest.replace(ckpt, ours)}", shard)]
        return [(f"model.layers.{layer - rng.start}.{rest}", None)]
    if name == "model.embed_tokens.weight":
        targets: list[tuple[str, object]] = [(name, None)] if rng.embed else []
        if cfg.tie_word_embeddings and rng.head and not rng.embed:
            targets.append(("lm_head.weight", None))  # tied head on a stage without the embedding
        return targets
    if name.startswith("visual."):  # the vision tower lives with the embedding
        return [(name, None)] if rng.embed and cfg.vision is not None else []
    if name == "model.norm.weight":
        return [(name, None)] if rng.head else []
    if name == "lm_head.weight":
        return [(name, None)] if rng.head and not cfg.tie_word_embeddings else []
    return []  # rotary caches and other extras some checkpoints carry


def load_model(
    source: str,
    dtype: str = "float32",
    device: str = "cpu",
    layers: tuple[int, int] | LayerRange | None = None,
    attn: str = "sdpa",
    quant: str = "none",
) -> LoadedModel:
    """Build and fill the model for `layers`; `quant` ("auto", "none", "int8", "int4") packs
    the linear weights once loaded, with the kernel this CPU runs fastest (layers/quant.py)."""
    path = resolve_model(source)
    cfg = read_config(path)
    if isinstance(layers, LayerRange):
        rng = layers
    else:
        rng = LayerRange(*(layers or (0, cfg.num_layers)), cfg.num_layers)
    kind = resolve_quant(quant, source, device)
    try:
        # Our integer kernels where they build (once per machine; torch's pack kernels otherwise).
        spec = choose(kind, device, native=kind != "none" and device.startswith("cpu") and kernels.load())
    except ValueError as e:
        raise InvalidParameter("quant", str(e)) from None
    cls = model_class(cfg.architecture)
    with _default_dtype(DTYPES[dtype]), torch.device(device):
        model = cls(cfg, rng, attn, spec)
    load_weights(model, path, rng)
    if spec is not None:
        packable = [m for m in model.modules() if isinstance(m, PackableWeight)]
        # The AMX tile records (batches and prompts) and, on bf16 CPUs without them, the bf16
        # copies (prompts) speed things up at a cost in memory: each is kept only while it
        # takes at most a quarter of what is free now (small models; big ones stay lean).
        tile_bytes = 0.625 if kind == "int4" else 1.0  # q4: 320-byte records a 512 weights
        if spec.tiles and not _room_for(packable, tile_bytes):
            spec = dataclasses.replace(spec, tiles=False)
            for m in packable:
                m.tiles = False
        if spec.dense_rows is not None and not _room_for(packable, 2 + (tile_bytes if spec.tiles else 0)):
            spec = dataclasses.replace(spec, dense_rows=None)
            for m in packable:
                m.dense_rows = None
        for m in tqdm(packable, desc=f"packing {kind} weights", unit="matrix", disable=None):
            m.process_weights_after_loading()
    log.info("layers [%d, %d): %s", rng.start, rng.end, describe(spec))
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, path, rng, kind)


def _room_for(layers: Sequence[PackableWeight], bytes_per_weight: float) -> bool:
    """Whether copies of the layers' weights at `bytes_per_weight` take at most a quarter of
    the memory available now."""
    import psutil

    need = bytes_per_weight * sum(m.weight.numel() for m in layers if m.weight is not None)
    return need <= psutil.virtual_memory().available // 4


def load_weights(model: LlamaForCausalLM, path: Path, rng: LayerRange) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    cfg: ModelConfig = model.config
    plan: dict[Path, list[tuple[str, list]]] = {}
    for name, file in _weight_files(path).items():
        if targets := map_name(name, rng, cfg, packed):
            plan.setdefault(file, []).append((name, targets))
    pending = {n for n in params}
    total = sum(len(v) for v in plan.values())
    with tqdm(total=total, desc=f"loading layers [{rng.start}, {rng.end})", unit="tensor", disable=None) as bar:
        for file, items in plan.items():
            with safe_open(str(file), framework="pt") as sf:
                for name, targets in items:
                    # A lazy slice: the weight loader reads the range this rank holds.
                    tensor = sf.get_slice(name)
                    for target, shard in targets:
                        if target not in params:
                            raise UnsupportedModel(f"checkpoint tensor {name} has no place in our model ({target})")
                        p = params[target]
                        getattr(p, "weight_loader", default_weight_loader)(p, tensor, shard)
                        pending.discard(target)
                    bar.update()
    # A tied lm_head shares its tensor with the embedding, which was loaded.
    if cfg.tie_word_embeddings and rng.embed and rng.head:
        pending.discard("lm_head.weight")
    if pending:
        raise UnsupportedModel(f"checkpoint is missing weights: {', '.join(sorted(pending)[:5])}")
