"""Sampler semantics: greedy, temperature/top-k/top-p/min-p, seeds, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from inference.config import SamplingParams
from inference.sampler import _CANDIDATES, SampleOutput, Sampler, SamplerState, _filter, apply_penalties

V = 16


def state(prompt: list[int] | None = None, **kw) -> SamplerState:
    return SamplerState(SamplingParams(**kw), prompt or [0])


def logits_for(probs: list[float]) -> torch.Tensor:
    """One row of logits whose softmax is exactly `probs` (padded with ~zero mass)."""
    p = torch.full((V,), 1e-12, dtype=torch.float64)
    p[: len(probs)] = torch.tensor(probs, dtype=torch.float64)
    return p.log().to(torch.float32).unsqueeze(0)


def support(logits: torch.Tensor, n: int = 800, **kw) -> set[int]:
    """Token ids drawn over n samples from one row (one state, so its generator advances)."""
    s, sampler = state(seed=0, **kw), Sampler()
    return {sampler(logits, [s])[0].token_id for _ in range(n)}


def test_greedy_is_argmax_fast_path_and_mixed_dtype():
    torch.manual_seed(0)
    x = torch.randn(5, V)
    x[3, 7] = x[3, 2] = x[3].max() + 1  # a tie resolves to the lowest id, like torch.argmax
    out = Sampler()(x.to(torch.bfloat16), [state(temperature=0) for _ in range(5)])
    assert all(isinstance(o, SampleOutput) and o.logprob is None for o in out)
    assert [o.token_id for o in out] == x.to(torch.bfloat16).float().argmax(-1).tolist()
    assert out[3].token_id == 2


def test_mixed_batch_greedy_rows_stay_argmax():
    torch.manual_seed(1)
    x = torch.randn(4, V)
    states = [state(temperature=0), state(seed=3), state(temperature=0), state(seed=4)]
    out = Sampler()(x, states)
    assert out[0].token_id == x[0].argmax().item() and out[2].token_id == x[2].argmax().item()


def test_top_k_never_leaves_the_k_best():
    torch.manual_seed(2)
    x = torch.randn(1, V)
    best = set(x[0].topk(3).indices.tolist())
    seen = support(x, temperature=1.5, top_k=3)
    assert seen == best


def test_top_p_keeps_smallest_set_with_the_mass():
    x = logits_for([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)
    assert support(x, top_p=0.65) == {1, 3}  # .4 < .65 <= .7
    assert support(x, top_p=0.8) == {1, 3, 4}  # .7 < .8 <= .85
    assert support(x, top_p=0.3) == {1}  # always at least the best token
    assert support(x, top_p=1.0, n=1000) >= {0, 1, 2, 3, 4}


def test_top_p_draws_follow_the_renormalised_distribution():
    x = logits_for([0.5, 0.3, 0.2])
    s, sampler = state(seed=7, top_p=0.75), Sampler()
    draws = [sampler(x, [s])[0].token_id for _ in range(2000)]
    # Kept {0, 1} with mass .8: expect 0.625 / 0.375.
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 0.625) < 0.04


def test_min_p_drops_tokens_below_fraction_of_max():
    x = logits_for([0.5, 0.2, 0.14, 0.1, 0.06])
    # threshold 0.25 * 0.5 = 0.125: keeps 0.5, 0.2, 0.14
    assert support(x, min_p=0.25) == {0, 1, 2}
    assert support(x, min_p=1.0) == {0}


def test_top_k_and_top_p_combine_per_row_in_a_batch():
    # Many rows, each with its own seed, in a few batched calls (cheaper than many calls).
    n = 300
    x = logits_for([0.4, 0.3, 0.2, 0.1]).expand(2 * n, V)
    states = [state(seed=i, top_k=1) for i in range(n)] + [state(seed=i, top_p=0.95) for i in range(n)]
    sampler = Sampler()
    rows: list[set[int]] = [set(), set()]
    for _ in range(3):
        for i, o in enumerate(sampler(x, states)):
            rows[i // n].add(o.token_id)
    assert rows == [{0}, {0, 1, 2, 3}]


def _reference_filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Top-k then top-p by their definitions, over a full sort of one row: probabilities."""
    x = row / p.temperature
    sorted_x, order = x.sort(descending=True)
    keep = torch.ones_like(sorted_x, dtype=torch.bool)
    if 0 < p.top_k < len(x):
        keep[p.top_k :] = False
    probs = sorted_x.masked_fill(~keep, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs
    keep &= before < p.top_p
    out = torch.zeros_like(x)
    out[order[keep]] = sorted_x[keep].softmax(-1)
    return out


def test_top_k_top_p_over_a_large_vocabulary_match_a_full_sort():
    """The candidate shortcut against the definition, on rows that take each path: a peaked
    row (nucleus inside the candidates), a flat row (nucleus wider than them), top_k above
    and below the candidate count, top_k with top_p. Each row alone equals it in the batch."""
    torch.manual_seed(0)
    vocab = 4 * _CANDIDATES
    peaked = torch.randn(vocab) * 6
    flat = torch.randn(vocab) * 0.1
    cases = [
        (peaked, SamplingParams(top_p=0.9)),
        (flat, SamplingParams(top_p=0.9)),
        (flat, SamplingParams(top_k=_CANDIDATES + 50)),
        (peaked, SamplingParams(top_k=7, top_p=0.5)),
        (flat, SamplingParams(top_k=_CANDIDATES, top_p=0.99)),
        (peaked, SamplingParams(temperature=0.7, top_p=0.99)),
        (peaked, SamplingParams(temperature=2.0)),
    ]
    rows = torch.stack([r for r, _ in cases])
    params = [p for _, p in cases]
    batched = _filter(rows, params)
    for i, (row, p) in enumerate(cases):
        want = _reference_filter(row, p)
        assert torch.equal(batched[i] > 0, want > 0), f"case {i}: kept set differs"
        torch.testing.assert_close(batched[i], want, rtol=1e-5, atol=1e-7)
        assert torch.equal(_filter(row[None], [p])[0], batched[i]), f"case {i}: depends on the batch"
    assert (batched[1] > 0).sum() > _CANDIDATES  # the flat nucleus really went past the candidates


def _run(seed: int | None, steps: int = 30, batch_mates: int = 0) -> list[int]:
    torch.manual_seed(123)
    mine = torch.randn(steps, 1, V)
    mates = torch.randn(steps, batch_mates, V)
    me = state(seed=seed, temperature=1.0)
    others = [state(seed=100 + i, temperature=0.7, top_p=0.9) for i in range(batch_mates)]
    sampler, toks = Sampler(), []
    for x, m in zip(mine, mates):
        # The seeded row is the last one, so its position in the batch changes with the mates.
        out = sampler(torch.cat([m, x]), others + [me])
        toks.append(out[-1].token_id)
    return toks


def test_same_seed_same_tokens_and_different_seed_differs():
    assert _run(42) == _run(42)
    assert _run(42) != _run(43)
    assert _run(None) != _run(None)  # unseeded states get fresh random seeds


def test_seeded_row_is_independent_of_batch_composition():
    assert _run(42) == _run(42, batch_mates=3) == _run(42, batch_mates=7)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0, 0.5]])
    s = state(prompt=[0, 1], repetition_penalty=2.0)
    s.observe(2)
    s.observe(3)
    s.observe(3)
    out = apply_penalties(x, [s])
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 0.5, -2.0, 3.0, 0.5]]))
    assert x[0, 0].item() == 2.0  # input untouched


def test_presence_and_frequency_penalties_count_output_only():
    x = torch.zeros(1, 6)
    s = state(prompt=[0, 1, 1], presence_penalty=0.5, frequency_penalty=0.25)
    for t in (2, 3, 3, 3):
        s.observe(t)
    out = apply_penalties(x, [s])
    expected = torch.tensor([[0.0, 0.0, -0.75, -1.25, 0.0, 0.0]])
    assert torch.allclose(out, expected)
    s.observe(2)  # counts keep accumulating across calls
    assert math.isclose(apply_penalties(x, [s])[0, 2].item(), -1.0)


def test_penalties_only_touch_their_rows_and_show_in_logprobs():
    torch.manual_seed(5)
    x = torch.randn(2, V)
    plain = state(temperature=0, logprobs=0)
    pen = state(prompt=[4], temperature=0, logprobs=0, repetition_penalty=1.5, frequency_penalty=1.0)
    pen.observe(9)
    out = Sampler()(x, [plain, pen])
    ref = x.clone()
    ref[1, 4] = ref[1, 4] / 1.5 if ref[1, 4] > 0 else ref[1, 4] * 1.5
    ref[1, 9] = (ref[1, 9] / 1.5 if ref[1, 9] > 0 else ref[1, 9] * 1.5) - 1.0
    lp = ref.log_softmax(-1)
    for i in range(2):
        assert out[i].token_id == ref[i].argmax().item()
        assert math.isclose(out[i].logprob, lp[i, out[i].token_id].item(), rel_tol=1e-5)


def test_greedy_penalty_changes_the_choice():
    x = torch.tensor([[3.0, 2.0, 0.0]])
    s = state(temperature=0, presence_penalty=2.0)
    s.observe(0)
    assert Sampler()(x, [s])[0].token_id == 1


@pytest.mark.parametrize("n", [0, 1, 5])
def test_logprobs_equal_log_softmax_and_top_n_sorted(n):
    torch.manual_seed(6)
    x = torch.randn(3, V) * 3
    states = [state(seed=1, temperature=0.8, logprobs=n), state(temperature=0), state(temperature=0, logprobs=2)]
    out = Sampler()(x, states)
    lp = x.log_softmax(-1)  # logprobs come from the logits before temperature
    o = out[0]
    assert math.isclose(o.logprob, lp[0, o.token_id].item(), rel_tol=1e-5, abs_tol=1e-6)
    assert len(o.top_logprobs) == n
    values = [t.logprob for t in o.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert [t.token_id for t in o.top_logprobs] == lp[0].topk(n).indices.tolist()
    for t in o.top_logprobs:
        assert math.isclose(t.logprob, lp[0, t.token_id].item(), rel_tol=1e-5, abs_tol=1e-6)
    assert out[1].logprob is None and out[1].top_logprobs is None
    assert len(out[2].top_logprobs) == 2 and out[2].top_logprobs[0].token_id == out[2].token_id


def test_temperature_sharpens_distribution():
    x = logits_for([0.6, 0.4])
    s_cold, s_hot, sampler = state(seed=1, temperature=0.2), state(seed=1, temperature=5.0), Sampler()
    cold = sum(sampler(x, [s_cold])[0].token_id == 0 for _ in range(500))
    hot = sum(sampler(x, [s_hot])[0].token_id == 0 for _ in range(500))
    assert cold > 420 and 200 < hot < 325  # 0.6^5/(0.6^5+0.4^5) = 0.88; T=5 -> ~0.52


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, V), [state()])
