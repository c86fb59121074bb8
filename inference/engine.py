"""Engine: one synchronous step of continuous batching, from token ids to text deltas.

`Engine.step()` schedules a batch, runs the model, samples, detokenizes and decides
which requests finished. The async wrapper (streams, abort on disconnect) builds on it."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from .config import EngineConfig, ModelConfig, SamplingParams
from .detokenizer import IncrementalDetokenizer, StopChecker, apply_chat_template
from .errors import InvalidParameter
from .grammar import Grammar, GrammarCompiler
from .kv_cache import KVCacheManager
from .loader import DTYPES, LoadedModel, load_model
from .model_runner import ModelRunner, kv_cache_dtype
from .multimodal import ImageInputs
from .runner import PromptSpan, Runner, StepInputs
from .sampler import SampleOutput, Sampler, SamplerState, score_tokens
from .scheduler import Scheduler
from .sequence import Sequence
from .vision_prompt import ImagePrompter

log = logging.getLogger(__name__)

# Default KV budget on CPU: at most this much, and at most a quarter of the memory
# available at start-up (the pool is zeroed, so it is resident from the start).
_KV_DEFAULT_GIB = 1.0
_KV_MEMORY_SHARE = 0.25
# On CUDA the device holds little else: take this share of its free memory.
_KV_CUDA_SHARE = 0.8
# Prompt rows scored per LM-head call: bounds the logits held at once (256 x a 49k vocabulary
# is 50 MB of float32) when a whole prefill chunk is scored.
_SCORE_ROWS = 256


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: new text and tokens, and whether it ended."""

    seq_id: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    # Prompt tokens whose KV came from the prefix cache (OpenAI's usage.prompt_tokens_details).
    num_cached_tokens: int = 0
    logprobs: list[SampleOutput] = field(default_factory=list)
    # With `prompt_logprobs`, on a request's first output only: prompt tokens 1.. scored given
    # the tokens before them (the first prompt token has nothing to be scored against).
    prompt_logprobs: list[SampleOutput] | None = None


@dataclass(slots=True)
class _Request:
    seq: Sequence
    state: SamplerState
    detok: IncrementalDetokenizer
    stop: StopChecker
    eos: frozenset[int]
    # Prompt tokens 1.. scored so far (prefill chunks add to it), None unless asked for.
    prompt_scores: list[SampleOutput] | None = None


def kv_pool_blocks(
    cfg: EngineConfig, mcfg: ModelConfig, num_layers: int, cuda_device: str | None = None, quant: str = "none"
) -> int:
    """The KV pool for `num_layers` layers: cfg.kv_cache_gb if set, else enough for
    max_batch full contexts, capped by device memory (and at 1 GiB on CPU). The one sizing
    rule: a single process, a TP group and a pipeline (all layers' worth, so every stage
    holds the same block ids) all use it. `quant`: how the weights are held (resolved, never
    "auto"), which decides the cache's dtype (model_runner.kv_cache_dtype)."""
    itemsize = kv_cache_dtype(DTYPES[cfg.dtype], cfg.device, quant).itemsize
    block_bytes = mcfg.kv_block_bytes(num_layers, cfg.block_size, itemsize)
    if cfg.kv_cache_gb is not None:
        budget = cfg.kv_cache_gb * 2**30
    else:
        wanted = -(-mcfg.max_position // cfg.block_size) * block_bytes * cfg.max_batch
        if cfg.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(cuda_device or cfg.device))
            budget = min(wanted, free * _KV_CUDA_SHARE)
        else:
            budget = min(wanted, psutil.virtual_memory().available * _KV_MEMORY_SHARE, _KV_DEFAULT_GIB * 2**30)
    return max(1, int(budget) // block_bytes)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def read_generation_config(path: Path) -> dict[str, Any]:
    """The model's generation_config.json (sampling defaults, extra end-of-turn ids); {} if
    it has none or it is unreadable (a warning: the model still serves with our defaults)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        gen = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", file, e)
        return {}
    return gen if isinstance(gen, dict) else {}


def _eos_ids(loaded: LoadedModel, tokenizer, gen: dict[str, Any]) -> frozenset[int]:
    ids = set(loaded.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = gen.get("eos_token_id")  # Llama 3 style checkpoints list several end-of-turn tokens here
    ids.update(t for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int))
    return frozenset(ids)


class Engine:
    """Invariant: every sequence in `_requests` is known to the scheduler (waiting or
    running) and leaves both at once when it finishes or is aborted."""

    def __init__(
        self,
        cfg: EngineConfig,
        loaded: LoadedModel | None = None,
        tokenizer=None,
        num_blocks: int | None = None,
        runner: Runner | None = None,
    ):
        """`runner` replaces the local ModelRunner (the pipeline master passes one that sends
        steps to its stages); then `num_blocks`, the pool every stage holds, is required."""
        self.cfg = cfg
        t0 = time.perf_counter()
        self.loaded = loaded or load_model(cfg.model, cfg.dtype, cfg.device, attn=cfg.attn, quant=cfg.quant)
        self.tokenizer = tokenizer or load_tokenizer(self.loaded.path)
        self.load_seconds = time.perf_counter() - t0
        mcfg = self.loaded.config
        dtype = DTYPES[cfg.dtype]
        kv_dtype = kv_cache_dtype(dtype, cfg.device, self.loaded.quant)
        block_bytes = mcfg.kv_block_bytes(len(self.loaded.layers), cfg.block_size, kv_dtype.itemsize)
        if num_blocks is None:
            num_blocks = kv_pool_blocks(cfg, mcfg, len(self.loaded.layers), quant=self.loaded.quant)
        self.kv = KVCacheManager(num_blocks, cfg.block_size, cfg.prefix_cache)
        self.max_model_len = min(cfg.max_model_len or mcfg.max_position, mcfg.max_position, self.kv.capacity_tokens)
        self.runner: Runner = runner or ModelRunner(
            self.loaded.model,
            mcfg,
            self.loaded.layers,
            num_blocks,
            cfg.block_size,
            dtype,
            cfg.device,
            self.loaded.quant,
        )
        self.scheduler = Scheduler(self.kv, cfg.max_batch, cfg.max_batch_tokens, cfg.max_seqs_per_request)
        self.sampler = Sampler()
        self.generation_config = read_generation_config(self.loaded.path)
        self.eos_ids = _eos_ids(self.loaded, self.tokenizer, self.generation_config)
        self.grammars = GrammarCompiler(self.tokenizer, mcfg.vocab_size, self.eos_ids)
        self.image_prompter: ImagePrompter | None = None
        if mcfg.vision is not None and cfg.tp > 1:
            # A TP step broadcasts token ids and 1-D positions; merged image embeddings and
            # M-RoPE rows are not part of it yet.
            log.warning("images are not supported with --tp > 1 yet: this model serves text only")
        elif mcfg.vision is not None and self.loaded.layers.embed:
            self.image_prompter = ImagePrompter(self.loaded.path, mcfg.vision, cfg.min_pixels, cfg.max_pixels)
        # Bytes of the vision tower's weights held here (0: none, or a text-only model); fixed,
        # so counted once rather than on every status refresh.
        visual = getattr(self.loaded.model, "visual", None)
        self.vision_bytes = sum(p.numel() * p.element_size() for p in visual.parameters()) if visual is not None else 0
        self._requests: dict[int, _Request] = {}
        self.num_aborted = 0
        log.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s); max context %d",
            num_blocks,
            cfg.block_size,
            num_blocks * block_bytes / 2**30,
            str(kv_dtype).removeprefix("torch."),
            self.max_model_len,
        )

    # -- requests ---------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, tools=tools)

    def encode_chat_images(
        self, messages: list[dict], images: list[Any], tools: list[dict] | None = None
    ) -> tuple[list[int], ImageInputs]:
        """A chat whose messages hold {"type": "image"} parts, one per PIL image in `images`."""
        if self.image_prompter is None:
            name = self.loaded.config.architecture
            raise InvalidParameter("messages", f"this model ({name}) has no vision: it cannot read images")
        return self.image_prompter.encode(self.tokenizer, messages, images, tools)

    def check_grammar(self, grammar: Grammar) -> None:
        """InvalidParameter naming `grammar.param` unless it compiles for this tokenizer;
        blocking (milliseconds; the first grammar builds the token trie, ~1 s)."""
        self.grammars.check(grammar)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, param: str = "messages") -> None:
        if num_prompt_tokens + 1 > self.max_model_len:
            model_max = self.loaded.config.max_position
            why = (
                f" (the KV cache budget, --kv-cache-gb; the model allows {model_max})"
                if self.max_model_len < model_max and self.max_model_len == self.kv.capacity_tokens
                else ""
            )
            raise InvalidParameter(
                param,
                f"the prompt has {num_prompt_tokens} tokens; this server's context is {self.max_model_len}{why}",
            )
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise InvalidParameter(
                "max_tokens",
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens",
            )

    def validate_prompt(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """InvalidParameter unless the prompt is non-empty, in the vocabulary, and fits the
        context with `max_tokens` more. Reads only fixed state: safe from any thread."""
        if not prompt_token_ids:
            raise InvalidParameter("prompt", "must not be empty")
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidParameter("prompt", "token ids must be in the vocabulary")
        self.check_length(len(prompt_token_ids), max_tokens, "prompt")

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        group: int | None = None,
        images: ImageInputs | None = None,
    ) -> int:
        """Queue a sequence; `group` ties the sequences of one client request (its n choices),
        whose batch slots the scheduler caps; `images` from `encode_chat_images`."""
        # One token of room is enough here: a request that reaches the context ends with "length".
        self.validate_prompt(prompt_token_ids, 1)
        seq = Sequence(list(prompt_token_ids), params, group=group, images=images)
        eos = frozenset() if params.ignore_eos else self.eos_ids
        req = _Request(
            seq,
            SamplerState(
                params,
                seq.prompt_token_ids,
                self.grammars.matcher(params.grammar) if params.grammar is not None else None,
            ),
            IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids),
            StopChecker(params.stop),
            eos | frozenset(params.stop_token_ids),
            [] if params.prompt_logprobs is not None else None,
        )
        self.scheduler.add(seq)
        self._requests[seq.seq_id] = req
        return seq.seq_id

    def abort(self, seq_id: int) -> bool:
        if self._requests.pop(seq_id, None) is None:
            return False
        self.scheduler.abort(seq_id)
        self.num_aborted += 1
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- one step ---------------------------------------------------------------------
    def step(self, admit: bool = True) -> list[RequestOutput]:
        """One forward pass; with `admit=False` only the running sequences advance."""
        out = self.scheduler.schedule(admit)
        outputs = [
            self._final(self._requests.pop(s.seq_id), s.finish_reason or "length")
            for s in out.finished
            if s.seq_id in self._requests
        ]
        if not out.scheduled:
            return outputs
        inputs = self.runner.prepare(out.scheduled)
        hidden = self.runner.forward(inputs)
        logits = self.runner.logits(inputs, hidden) if inputs.sample_rows else None
        for span in inputs.prompt_spans:
            self._score_prompt(inputs, hidden, span, self._requests[out.scheduled[span.batch_idx].seq.seq_id])
        self.scheduler.postprocess(out)
        if logits is None:
            return outputs
        reqs = [self._requests[out.scheduled[i].seq.seq_id] for i in inputs.sample_batch_idx]
        for req, sample in zip(reqs, self.sampler(logits, [r.state for r in reqs])):
            outputs.append(self._advance(req, sample))
        return outputs

    def _score_prompt(self, inputs: StepInputs, hidden: torch.Tensor, span: PromptSpan, req: _Request) -> None:
        """Score the prompt tokens `span` predicts that `req` has not scored yet (a sequence
        preempted and recomputed runs its prompt again)."""
        scores, prompt = req.prompt_scores, req.seq.prompt_token_ids
        if scores is None:
            return
        first = len(scores) - span.position  # rows already scored in an earlier run
        for lo in range(max(0, first), span.count, _SCORE_ROWS):
            hi = min(lo + _SCORE_ROWS, span.count)
            rows = list(range(span.row + lo, span.row + hi))
            logits = self.runner.logits(dataclasses.replace(inputs, sample_rows=rows), hidden)
            targets = prompt[span.position + lo + 1 : span.position + hi + 1]
            scores += score_tokens(logits, targets, req.seq.params.prompt_logprobs or 0)

    def _advance(self, req: _Request, sample: SampleOutput) -> RequestOutput:
        seq, tok = req.seq, sample.token_id
        seq.append_token(tok)
        req.state.observe(tok)
        reason = None
        text = ""
        if tok in req.eos:
            reason = "stop"
        else:
            text, hit = req.stop.feed(req.detok.add(tok))
            # A grammar that admits nothing more ends the output now, not one step later.
            if hit or (req.state.grammar is not None and req.state.grammar.done):
                reason = "stop"
            elif len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            text += req.stop.flush()
            self.scheduler.finish(seq, reason)
            del self._requests[seq.seq_id]
        return RequestOutput(
            seq.seq_id,
            text,
            [tok],
            reason is not None,
            reason,
            seq.num_prompt_tokens,
            len(seq.output_token_ids),
            seq.num_cached_tokens,
            [sample] if sample.logprob is not None else [],
            req.prompt_scores if len(seq.output_token_ids) == 1 else None,
        )

    def _final(self, req: _Request, reason: str) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            seq.seq_id,
            req.stop.flush(),
            [],
            True,
            reason,
            seq.num_prompt_tokens,
            len(seq.output_token_ids),
            seq.num_cached_tokens,
        )

    # -- convenience --------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[tuple[list[int], str, str]]:
        """Run prompts to completion; returns (token ids, text, finish reason) per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        acc: dict[int, tuple[list[int], list[str], list[str]]] = {i: ([], [], []) for i in ids}
        while self.has_work:
            for o in self.step():
                toks, texts, reason = acc[o.seq_id]
                toks += o.token_ids
                texts.append(o.text)
                if o.finished:
                    reason.append(o.finish_reason or "stop")
        return [(acc[i][0], "".join(acc[i][1]), acc[i][2][0]) for i in ids]
