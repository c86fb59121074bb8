"""Typed configuration: the model's shape, the engine's knobs, one request's sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameter, UnsupportedModel
from .vision_config import VisionConfig

if TYPE_CHECKING:  # grammar.py loads llguidance: only the engine needs it at run time
    from .grammar import Grammar


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The subset of a HF `config.json` that our model code reads."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    # HF's rope_scaling dict (rope_type "llama3", "linear", ...) or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Multimodal rotary (Qwen2-VL): rotary frequency pairs per position axis (temporal,
    # height, width); None for plain 1-D RoPE.
    mrope_section: tuple[int, ...] | None = None
    vision: VisionConfig | None = None  # the vision tower, if the model sees images

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        vision = VisionConfig.from_hf(cfg) if "vision_config" in cfg else None
        if isinstance(cfg.get("text_config"), dict):
            # transformers 5 nests a multimodal model's decoder settings; hub files keep them flat.
            cfg = {**cfg, **cfg["text_config"], "architectures": cfg.get("architectures")}
        archs = cfg.get("architectures") or []
        if not archs:
            # GGUF-derived configs name only the model_type.
            archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(
                cfg.get("model_type", ""), [cfg.get("model_type", "unknown")]
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers 5 moved rope settings under rope_parameters; 4.x kept them flat.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        mrope = rope.get("mrope_section") or (scaling or {}).get("mrope_section")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default", "mrope"):
            scaling = None  # M-RoPE's frequencies are the default ones, split over 3 axes
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            rope_scaling=dict(scaling) if scaling else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            mrope_section=tuple(mrope) if mrope else None,
            vision=vision,
        )

    def kv_block_bytes(self, num_layers: int, block_size: int, dtype_bytes: int) -> int:
        """Bytes one KV-cache block costs over `num_layers` layers, keys and values, all KV
        heads (the one rule behind pool sizing and the layer planner)."""
        return 2 * num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class LayerRange:
    """What one stage holds (exo's `Shard`): decoder layers [start, end) of a model with
    `num_layers` layers, plus the embedding (`embed`) and/or the final norm and LM head
    (`head`). By default a range starting at 0 embeds and one ending at the last layer
    has the head; a pipeline master holds both ends and no layers."""

    start: int
    end: int
    num_layers: int
    embed: bool | None = None
    head: bool | None = None

    def __post_init__(self) -> None:
        # Frozen: derived defaults are written once, here.
        if self.embed is None:
            object.__setattr__(self, "embed", self.start == 0)
        if self.head is None:
            object.__setattr__(self, "head", self.end == self.num_layers)
        if not 0 <= self.start <= self.end <= self.num_layers or (
            self.start == self.end and not (self.embed or self.head)
        ):
            raise InvalidParameter("layers", f"range [{self.start}, {self.end}) is not inside 0..{self.num_layers}")

    def __len__(self) -> int:
        return self.end - self.start


ATTN_BACKENDS = ("sdpa", "xformers", "flash")
COMPUTE_BACKENDS = ("torch", "mlx")  # what runs the layers (`--backend auto` resolves to one)
QUANT_CHOICES = ("auto", "none", "int8", "int4")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "cpu"
    # KV cache budget in GiB; None sizes it from the model (enough for max_batch full contexts,
    # capped at a quarter of free memory).
    kv_cache_gb: float | None = None
    block_size: int = 16
    max_batch: int = 32
    max_batch_tokens: int = 2048
    # Batch slots the sequences of one request (its n choices) may hold; None: half of
    # max_batch, so one client's n copies never take every slot.
    max_seqs_per_request: int | None = None
    max_model_len: int | None = None
    attn: str = "sdpa"
    # Tensor-parallel ranks on this machine. `inference.tp_runner.tp_engine(cfg)` starts
    # them; a plain `Engine(cfg)` is one process whatever this says.
    tp: int = 1
    # Weights: "none" (float, the parity path), "int8", "int4", or "auto" (a GGUF source keeps
    # its own precision on CPU; the command line's default). See inference/layers/quant.py.
    quant: str = "none"
    # What runs the layers: "torch", or "mlx" (inference/mlx/: Metal on Apple silicon, CPU elsewhere).
    backend: str = "torch"
    adapter: str | None = None  # a LoRA adapter folder (inference.mlx.lora); MLX backend only
    # Reuse the KV of cached token prefixes (inference/prefix_cache.py); False recomputes
    # every prompt in full (--no-prefix-cache).
    prefix_cache: bool = True
    # Image resize bounds of a vision model (pixels per image; None: the processor's own).
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise InvalidParameter("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.quant not in QUANT_CHOICES:
            raise InvalidParameter("quant", f"{self.quant!r} is not one of {', '.join(QUANT_CHOICES)}")
        if self.backend not in COMPUTE_BACKENDS:
            raise InvalidParameter("backend", f"{self.backend!r} is not one of {', '.join(COMPUTE_BACKENDS)}")
        if self.adapter and self.backend != "mlx":
            raise InvalidParameter("adapter", "LoRA adapters are served by the MLX backend: add --backend mlx")
        if self.attn not in ATTN_BACKENDS:
            raise InvalidParameter("attn", f"{self.attn!r} is not one of {', '.join(ATTN_BACKENDS)}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise InvalidParameter("kv_cache_gb", "must be > 0")
        for name in ("block_size", "max_batch", "max_batch_tokens", "tp"):
            if getattr(self, name) < 1:
                raise InvalidParameter(name, "must be >= 1")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidParameter(name, "must be >= 1")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise InvalidParameter("min_pixels", "must not exceed max_pixels")
        if self.max_seqs_per_request is not None and self.max_seqs_per_request < 1:
            raise InvalidParameter("max_seqs_per_request", "must be >= 1")


@dataclass(slots=True)
class SamplingParams:
    """One request's decoding settings; validated on construction (errors name the field)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to report; None = no logprobs
    grammar: Grammar | None = None  # constrained decoding: what the output must match
    # Score the prompt too (vLLM's name): the logprob of each prompt token after the first,
    # given those before it, with this many top alternatives; None = don't score it.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidParameter(name, why)

        def finite(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, f"must be a finite number, got {v!r}")
            return float(v)

        if finite("temperature") < 0:
            bad("temperature", "must be >= 0")
        if not 0 < finite("top_p") <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= finite("min_p") <= 1:
            bad("min_p", "must be in [0, 1]")
        if finite("repetition_penalty") <= 0:
            bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name) <= 2:
                bad(name, "must be in [-2, 2]")
        for name in ("top_k", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, f"must be an integer, got {v!r}")
        if self.top_k < -1:
            bad("top_k", "must be >= 0 (0 or -1 disables it)")
        if self.top_k == -1:
            self.top_k = 0
        if self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 20):
                bad(name, "must be an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
