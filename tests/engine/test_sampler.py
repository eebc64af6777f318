"""The sampler against independent definitions: filters, penalties, greedy, and the distribution it
draws from (chi-square goodness of fit, false-alarm rate 1e-4 per test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loom.engine.sampler import SamplingRow, filter_logits, make_generator, sample, sample_row
from loom.sampling_params import SamplingParams
from tests.stats import chi2_critical, chi2_stat

LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, 1.0])


def expected(logits: torch.Tensor, t: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> dict[int, float]:
    """The target distribution, from the definitions, in float64."""
    x = logits.double().numpy() / t
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    order = np.argsort(-p, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0)
    q /= q.sum()
    if top_p < 1:
        cum = 0.0
        for i in order:
            if not keep[i]:
                continue
            if cum >= top_p:
                keep[i] = False
            cum += q[i]
    q = np.where(keep, p, 0)
    q /= q.sum()
    if min_p:
        keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0)
    q /= q.sum()
    return {i: float(q[i]) for i in range(len(q))}


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.7, top_k=4),
                                dict(temperature=1.0, top_p=0.8), dict(temperature=1.0, min_p=0.3),
                                dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)])
def test_sampled_distribution(kw):
    params = SamplingParams(seed=1234, **kw)
    row = SamplingRow(params, [], [], make_generator(params.seed))
    draws = [sample_row(LOGITS, row) for _ in range(20000)]
    probs = expected(LOGITS, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    stat, df = chi2_stat(draws, probs)
    assert stat < chi2_critical(df), (stat, df, probs)


def test_filters_keep_the_right_sets():
    x = LOGITS.clone()
    assert torch.isfinite(filter_logits(x, 3, 1.0, 0.0)).nonzero().flatten().tolist() == [0, 1, 2]
    probs = torch.softmax(x, 0)
    kept = torch.isfinite(filter_logits(x, 0, 0.5, 0.0)).nonzero().flatten().tolist()
    # smallest set of top tokens with mass >= 0.5
    order = torch.argsort(probs, descending=True).tolist()
    need, mass = [], 0.0
    for i in order:
        need.append(i)
        mass += probs[i].item()
        if mass >= 0.5:
            break
    assert sorted(kept) == sorted(need)
    kept = torch.isfinite(filter_logits(x, 0, 1.0, 0.5)).nonzero().flatten().tolist()
    assert sorted(kept) == [i for i in range(10) if probs[i] >= 0.5 * probs.max()]
    # top_p tiny still keeps the best token
    assert torch.isfinite(filter_logits(x, 0, 1e-6, 0.0)).nonzero().flatten().tolist() == [0]


def test_greedy_is_argmax_whatever_the_filters():
    logits = torch.randn(5, 100)
    rows = [SamplingRow(SamplingParams(temperature=0, top_k=3, top_p=0.1), [], []) for _ in range(5)]
    assert sample(logits, rows) == logits.argmax(-1).tolist()


def test_penalties_follow_their_formulas():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    prompt, output = [0, 1], [2, 2, 3]
    p = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    from loom.engine.sampler import processed_logits

    got = processed_logits(logits, SamplingRow(p, prompt, output))
    want = [2.0 / 2, -2.0 * 2, 1.0 / 2 - 0.5 * 2 - 0.25, -1.0 * 2 - 0.5 - 0.25, 0.5]
    assert got.tolist() == pytest.approx(want)
    bias = SamplingParams(temperature=0, logit_bias={4: 10.0, 0: -100.0})
    assert sample(logits[None], [SamplingRow(bias, [], [])]) == [4]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    row = SamplingRow(p, [], [7], eos_token_ids=(1,))
    assert sample(logits[None], [row]) == [3]
    row = SamplingRow(p, [], [7, 7], eos_token_ids=(1,))
    assert sample(logits[None], [row]) == [1]


def test_seed_reproducible_and_independent_of_batch():
    logits = torch.randn(50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample_row(logits, r) for r in [SamplingRow(p, [], [], make_generator(7))] for _ in range(30)]
    row = SamplingRow(p, [], [], make_generator(7))
    other = SamplingRow(SamplingParams(temperature=1.0), [], [], make_generator(None))
    b = []
    for _ in range(30):  # the same request sampled beside another one
        b.append(sample(torch.stack([torch.randn(50), logits]), [other, row])[1])
    assert a == b
    c = [sample_row(logits, SamplingRow(p, [], [], make_generator(8))) for _ in range(30)]
    assert a != c


def test_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2),
                dict(max_tokens=0), dict(repetition_penalty=0), dict(presence_penalty=3), dict(stop=[""]),
                dict(min_tokens=5, max_tokens=2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]
    assert math.isclose(SamplingParams(temperature=0).temperature, 0)


def test_sampling_leaves_the_callers_logits_untouched():
    logits = torch.randn(3, 20)
    before = logits.clone()
    top = [int(r.argmax()) for r in logits]
    rows = [SamplingRow(SamplingParams(temperature=0, min_tokens=5), [], [], eos_token_ids=(top[0],)),
            SamplingRow(SamplingParams(temperature=0), [], []),
            SamplingRow(SamplingParams(temperature=0.5, seed=1, repetition_penalty=1.3), [1], [2])]
    tokens = sample(logits, rows)
    assert torch.equal(logits, before)
    assert tokens[0] != top[0] and tokens[1] == top[1]  # EOS banned for row 0 only


def test_a_tiny_repetition_penalty_stays_finite():
    from loom.engine.sampler import apply_penalties

    logits = torch.tensor([0.5, 2.0, -1.0, 3.0])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=5e-324), [1, 2], [])
    assert torch.isfinite(out).all()
    probs = torch.softmax(out, dim=-1)
    assert not probs.isnan().any() and probs[1] == 1.0  # the seen token with a positive logit takes it all
