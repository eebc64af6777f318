"""The rejection sampler is lossless: whatever the draft distribution q (including q = 0 where p > 0,
and deterministic drafts), every emitted token follows the target's p, for k = 1..8.

Each test is a chi-square goodness-of-fit test at a false-alarm rate of 1e-6 (z = 4.753) with fixed
seeds, so the suite is deterministic and the family of ~200 tests still false-alarms < 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from loom.engine.sampler import draw
from loom.engine.speculative import Draft, accept_greedy, expected_tokens_per_pass, rejection_sample
from tests.stats import chi2_critical, chi2_stat

Z_1E6 = 4.753424
V = 5
POSITIONS = 6


def _distributions(seed: int, zero_q: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made p_t and q_t for absolute positions t (float64 rows)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(POSITIONS + 9, V, generator=g, dtype=torch.float64) ** 2
    q = torch.rand(POSITIONS + 9, V, generator=g, dtype=torch.float64) ** 2
    p[:, 0] = 0.0  # a token the target never emits: the draft may propose it
    if zero_q:
        q[:, 1:3] = 0.0  # tokens the target likes but the draft never proposes
    return p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)


def _generate(p: torch.Tensor, q: torch.Tensor | None, k: int, g: torch.Generator) -> list[int]:
    """Speculative generation of POSITIONS tokens where the target's distribution at position t is p_t
    (and the draft's q_t) whatever came before."""
    out: list[int] = []
    while len(out) < POSITIONS:
        t = len(out)
        if q is None:  # deterministic drafts (as n-gram lookup makes): q_t one-hot
            draft = Draft([(t + i) % V for i in range(k)])
        else:
            draft = Draft([draw(q[t + i], g) for i in range(k)], q[t:t + k])
        m, token = rejection_sample(p[t:t + k + 1], draft, g)
        out += draft.tokens[:m] + [token]
    return out[:POSITIONS]


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("kind", ["sampled", "q-zero", "deterministic"])
def test_every_position_follows_the_target(k, kind):
    p, q = _distributions(seed=k, zero_q=kind == "q-zero")
    g = torch.Generator().manual_seed(100 + k)
    trials = 2000
    samples = [_generate(p, None if kind == "deterministic" else q, k, g) for _ in range(trials)]
    for t in range(POSITIONS):
        probs = {v: float(p[t, v]) for v in range(V)}
        stat, df = chi2_stat([s[t] for s in samples], probs)
        assert stat < chi2_critical(df, Z_1E6), f"position {t}: chi2 {stat:.1f} (df {df})"


def test_drafts_the_target_agrees_with_are_all_accepted():
    p = torch.zeros(4, 3, dtype=torch.float64)
    p[:, 2] = 1.0
    m, token = rejection_sample(p, Draft([2, 2, 2]), torch.Generator().manual_seed(0))
    assert (m, token) == (3, 2)  # all kept, then the bonus token from p_4
    m, token = rejection_sample(p, Draft([2, 1, 2]), torch.Generator().manual_seed(0))
    assert (m, token) == (1, 2)  # the second is impossible under p: rejected and replaced


def test_greedy_acceptance():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == (3, 7)
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == (1, 9)
    assert accept_greedy([1, 2], [3]) == (0, 1)


def test_expected_tokens_per_pass():
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    a, k = 0.7, 3
    assert expected_tokens_per_pass(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))
