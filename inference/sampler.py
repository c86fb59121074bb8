"""Batched sampling with per-sequence parameters (vLLM / OpenAI / HF semantics).

Order of operations for one row:
  raw logits -> repetition penalty -> presence/frequency penalties   ("processed" logits;
  logprobs are reported from their log-softmax)
  -> a constrained row's grammar mask (forbidden tokens to -inf; only those rows are touched)
  -> greedy argmax, or: / temperature -> top-k -> top-p -> min-p -> draw with the row's generator.
Logprobs come from before the grammar mask: they are the model's, and show how far a grammar
pushed it (vLLM reports its raw logprobs the same way).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from . import kernels
from .config import SamplingParams
from .grammar import GrammarMatcher, masked_rows

# Below this temperature dividing the logits overflows softmax for no benefit: treat as greedy
# (vLLM does the same).
_GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(slots=True)
class SampleOutput:
    token_id: int
    # Both None unless the request asked for logprobs; top_logprobs is sorted descending and
    # holds params.logprobs entries (possibly zero).
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None


class SamplerState:
    """Per-sequence sampling state; lives as long as the request.

    Invariants: `generator` (a CPU generator, whatever device the logits are on) yields one
    uniform number per sampled step, so a seeded sequence's draws depend only on its seed and
    its own history, never on which other rows share its batch. Penalty counters cover the
    prompt plus every token passed to `observe` (the sequence's output), and are only kept
    when a penalty is active. `grammar` (constrained requests only) has consumed exactly the
    observed tokens; it is dropped with the state when the sequence ends.
    """

    __slots__ = (
        "params",
        "grammar",
        "seed",
        "num_generated",
        "generator",
        "_prompt_ids",
        "_pending",
        "_prompt_mask",
        "_out_counts",
    )

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], grammar: GrammarMatcher | None = None):
        self.params = params
        self.grammar = grammar
        # A random seed is still recorded so an unseeded run can be reproduced from logs.
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self.num_generated = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self._prompt_ids: list[int] | None = list(prompt_token_ids) if self.has_penalties else None
        # Tokens observed since the last sampling step: flushed into the device tensors in one
        # scatter instead of one tiny device write per token.
        self._pending: list[int] = []
        self._prompt_mask: torch.Tensor | None = None  # [V] bool, prompt tokens
        self._out_counts: torch.Tensor | None = None  # [V] float32, output token counts

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def observe(self, token_id: int) -> None:
        """Record a generated token (the penalties count it from the next step on)."""
        self.num_generated += 1
        if self.has_penalties:
            self._pending.append(token_id)
        # A refused token (impossible under the mask) leaves the matcher failed: `done`.
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def penalty_tensors(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_mask [V] bool, output_counts [V] float32), brought up to date."""
        mask, counts = self._prompt_mask, self._out_counts
        if mask is None or counts is None or counts.device != device:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(self._prompt_ids or [], dtype=torch.long, device=device)
            # Prompt ids past the LM head (added tokens) can never be sampled: ignore them.
            mask[ids[ids < vocab_size]] = True
            # Moving device (rare) carries the counts over.
            counts = torch.zeros(vocab_size, device=device) if counts is None else counts.to(device)
            self._prompt_mask, self._out_counts = mask, counts
        if self._pending:
            ids = torch.tensor(self._pending, dtype=torch.long, device=device)
            counts.index_add_(0, ids, torch.ones(len(self._pending), device=device))
            self._pending.clear()
        return mask, counts


def apply_penalties(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Return float32 logits with each row's repetition/presence/frequency penalties applied.

    Repetition (HF/vLLM): tokens seen in prompt or output get positive logits divided and
    negative ones multiplied by the penalty. Presence/frequency (OpenAI): over output tokens,
    subtract `presence` once and `frequency * count`. The input is never modified.
    """
    out = logits.to(torch.float32, copy=True)
    rows = [i for i, s in enumerate(states) if s.has_penalties]
    if not rows:
        return out
    dev, vocab = out.device, out.shape[-1]
    masks, counts = zip(*(states[i].penalty_tensors(vocab, dev) for i in rows))
    prompt_mask, count = torch.stack(masks), torch.stack(counts)
    params = [states[i].params for i in rows]

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev).unsqueeze(1)

    rep = col([p.repetition_penalty for p in params])
    pres = col([p.presence_penalty for p in params])
    freq = col([p.frequency_penalty for p in params])
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    sub = out.index_select(0, idx)
    in_output = count > 0
    seen = prompt_mask | in_output
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * count - pres * in_output.to(torch.float32)
    out.index_copy_(0, idx, sub)
    return out


# Top-k / top-p look at this many best tokens first: a topk of 256 costs ~2 ms for 16 rows of
# a 49k vocabulary where a full sort costs ~37 ms. A row whose kept set may reach past them
# (top_k above it, or a nucleus wider than their mass) is sorted in full instead.
_CANDIDATES = 256


def _sorted_drop(
    sorted_logits: torch.Tensor, full_probs: torch.Tensor | None, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """Which of each row's best-first logits top-k and top-p drop ([n, K] bool).

    top_k[i] is 0 for no top-k. `full_probs` are the rows' probabilities over the whole
    vocabulary in the same order (None when `sorted_logits` is the whole vocabulary): a row
    without top-k measures its nucleus by them, a row with top-k renormalises over its k."""
    width, dev = sorted_logits.shape[1], sorted_logits.device
    k = torch.tensor([n or width for n in top_k], device=dev)
    drop = torch.arange(width, device=dev).unsqueeze(0) >= k.unsqueeze(1)
    if any(p < 1.0 for p in top_p):
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        if full_probs is not None:
            no_k = torch.tensor([n == 0 for n in top_k], device=dev).unsqueeze(1)
            probs = torch.where(no_k, full_probs, probs)
        # Mass strictly before each token: a token is kept while the tokens above it have
        # not yet reached top_p, which keeps the smallest set with mass >= top_p and
        # always the first token. Disabled rows get a threshold no sum can reach.
        threshold = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=dev)
        drop |= (probs.cumsum(dim=-1) - probs) >= threshold.unsqueeze(1)
    return drop


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`logits` with the tokens top-k and top-p drop set to -inf. Each row's result, and
    which path computes it, depends on that row alone, so batching never changes a draw."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    width = min(_CANDIDATES, vocab)
    vals, idx = logits.topk(width, dim=-1)
    full = logits.softmax(dim=-1).gather(1, idx)
    drop = _sorted_drop(vals, full, top_k, top_p)
    out = torch.full_like(logits, float("-inf")).scatter(1, idx, vals.masked_fill(drop, float("-inf")))
    # The candidates decide a row exactly when its top_k fits in them, or when it has no
    # top_k and they already hold its nucleus (so the first token past them is dropped).
    slow = [
        i
        for i, (k, p, mass) in enumerate(zip(top_k, top_p, full.sum(dim=-1).tolist()))
        if k > width or k == 0 and p < 1.0 and mass < p
    ]
    # Rows sharing the batch with neither filter keep every token.
    unfiltered = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k == 0 and p >= 1.0]
    if unfiltered:
        rows = torch.tensor(unfiltered, device=logits.device)
        out.index_copy_(0, rows, logits.index_select(0, rows))
    if slow:
        rows = torch.tensor(slow, device=logits.device)
        sub = logits.index_select(0, rows)
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        sdrop = _sorted_drop(sorted_logits, None, [top_k[i] for i in slow], [top_p[i] for i in slow])
        out.index_copy_(0, rows, sub.scatter(1, order, sorted_logits.masked_fill(sdrop, float("-inf"))))
    return out


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on a batch of sampled rows; returns probabilities."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    logits = logits / temps.unsqueeze(1)
    if any(0 < p.top_k < logits.shape[-1] or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        # p_i / p_max is unchanged by renormalising over the kept set, so one softmax suffices.
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling, row i driven by generators[i] alone.

    Equivalent in distribution to torch.multinomial(probs[i], 1, generator=g) per row, but the
    per-row work is one CPU random number instead of a multinomial per row (several kernel
    launches each on a GPU: ~0.14 ms a row on an H200, 18 ms for a batch of 128).
    """
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in generators])
    # float64 so the tail of a 150k-token vocabulary is not lost to rounding.
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    x = (u.to(probs.device) * cdf[:, -1]).unsqueeze(1)
    # right=True finds the first token whose cdf exceeds x: a zero-probability token has the
    # same cdf as the one before it, so it is never chosen.
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)
    # x == total can only come from rounding when u is within 2**-53 of 1.
    return torch.where(idx < probs.shape[-1], idx, probs.argmax(dim=-1))


class Sampler:
    """Turns a batch of last-position logits into one token per sequence."""

    def __call__(self, logits: torch.Tensor, states: list[SamplerState]) -> list[SampleOutput]:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} states")
        params = [s.params for s in states]
        greedy = [p.temperature < _GREEDY_TEMPERATURE for p in params]
        want_logprobs = any(p.logprobs is not None for p in params)
        penalties = any(s.has_penalties for s in states)
        constrained = [i for i, s in enumerate(states) if s.grammar is not None]
        if all(greedy) and not want_logprobs and not penalties:
            # Hot path for benchmarks: argmax is exact in any float dtype.
            token_ids: list[int] = kernels.argmax(logits).tolist()
            if constrained:
                rows = masked_rows(logits, constrained, [g for s in states if (g := s.grammar) is not None])
                for i, t in zip(constrained, rows.argmax(dim=-1).tolist()):
                    token_ids[i] = t
            return [SampleOutput(t) for t in token_ids]

        processed = apply_penalties(logits, states) if penalties else logits.float()
        # A constrained row is chosen from its masked copy; `processed` keeps the model's
        # values for the logprobs.
        masked: torch.Tensor | None = None
        if constrained:
            masked = masked_rows(processed, constrained, [g for s in states if (g := s.grammar) is not None])
        where = {row: j for j, row in enumerate(constrained)}
        token_ids = kernels.argmax(processed).tolist() if any(greedy) else [0] * len(states)
        if masked is not None:
            for i, t in zip(constrained, masked.argmax(dim=-1).tolist()):
                if greedy[i]:
                    token_ids[i] = t
        sampled = [i for i, g in enumerate(greedy) if not g]
        if sampled:
            idx = torch.tensor(sampled, dtype=torch.long, device=processed.device)
            rows = processed.index_select(0, idx)
            swap = [(k, where[i]) for k, i in enumerate(sampled) if i in where]
            if masked is not None and swap:
                to, src = zip(*swap)
                rows[list(to)] = masked[list(src)]
            probs = _filter(rows, [params[i] for i in sampled])
            draws = _draw(probs, [states[i].generator for i in sampled]).tolist()
            for i, t in zip(sampled, draws):
                token_ids[i] = t
        outputs = [SampleOutput(t) for t in token_ids]
        if want_logprobs:
            self._fill_logprobs(processed, states, outputs)
        return outputs

    @staticmethod
    def _fill_logprobs(processed: torch.Tensor, states: list[SamplerState], outputs: list[SampleOutput]) -> None:
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        dev = processed.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        logp = processed.index_select(0, idx).log_softmax(dim=-1)
        chosen = torch.tensor([outputs[i].token_id for i in rows], dtype=torch.long, device=dev)
        chosen_lp = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        n_max = max(states[i].params.logprobs or 0 for i in rows)
        top_v, top_i = logp.topk(n_max, dim=-1) if n_max else (logp[:, :0], logp[:, :0].long())
        top_vals, top_ids = top_v.tolist(), top_i.tolist()
        for row, i in enumerate(rows):
            n = states[i].params.logprobs or 0
            outputs[i].logprob = chosen_lp[row]
            outputs[i].top_logprobs = [TokenLogprob(t, v) for t, v in zip(top_ids[row][:n], top_vals[row][:n])]


def score_tokens(logits: torch.Tensor, targets: list[int], k: int) -> list[SampleOutput]:
    """Each row's logprob of its target token, with the row's `k` best alternatives: how a
    prompt is scored (`prompt_logprobs`). From the raw logits: no penalty or temperature
    applies to tokens that were given rather than sampled (vLLM reports the same)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = torch.tensor(targets, dtype=torch.long, device=logp.device)
    values = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return [
        SampleOutput(t, v, [TokenLogprob(a, b) for a, b in zip(ids, vals)])
        for t, v, ids, vals in zip(targets, values, top_i.tolist(), top_v.tolist())
    ]
