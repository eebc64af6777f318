"""Magnitude and Wanda masks equal a naive reference computed from their formulas; every selection is
exact in its count (per layer, per row, per group of M)."""

from __future__ import annotations

import math

import pytest
import torch

from loom.compress.prune.magnitude import magnitude_mask
from loom.compress.prune.masks import NMPattern, PruningError, check_target, layer_mask, nm_mask, row_mask
from loom.compress.prune.wanda import InputNorms, wanda_mask

ROWS, COLS = 6, 16


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, COLS, generator=g) * torch.linspace(0.1, 5.0, COLS)


def _naive_lowest(scores: list[float], count: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda j: scores[j])[:count])


def _naive_mask(w, score_of, target) -> torch.Tensor:
    """The formula, element by element: the lowest scores of the layer, of each row, or of each M-group."""
    mask = torch.zeros(ROWS, COLS, dtype=torch.bool)
    if isinstance(target, NMPattern):
        for i in range(ROWS):
            for g0 in range(0, COLS, target.m):
                for j in _naive_lowest([score_of(i, j) for j in range(g0, g0 + target.m)], target.n):
                    mask[i, g0 + j] = True
    elif score_of.per_row:
        for i in range(ROWS):
            for j in _naive_lowest([score_of(i, j) for j in range(COLS)], int(COLS * target)):
                mask[i, j] = True
    else:
        flat = [score_of(i, j) for i in range(ROWS) for j in range(COLS)]
        for f in _naive_lowest(flat, int(ROWS * COLS * target)):
            mask[f // COLS, f % COLS] = True
    return mask


class _Score:
    def __init__(self, fn, per_row: bool) -> None:
        self.fn, self.per_row = fn, per_row

    def __call__(self, i: int, j: int) -> float:
        return self.fn(i, j)


TARGETS = [0.5, 0.3, 0.75, NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_magnitude_mask_is_the_formula(w, target):
    naive = _naive_mask(w, _Score(lambda i, j: abs(float(w[i, j])), per_row=False), target)
    assert torch.equal(magnitude_mask(w, target), naive)


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_wanda_mask_is_the_formula(w, x, target):
    norms = InputNorms(COLS)
    norms.add(x[:25])
    norms.add(x[25:])  # accumulated over batches
    col_norm = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(COLS)]
    naive = _naive_mask(w, _Score(lambda i, j: abs(float(w[i, j])) * col_norm[j], per_row=True), target)
    assert torch.equal(wanda_mask(w, norms.value(), target), naive)


def test_wanda_differs_from_magnitude_when_inputs_are_uneven(w, x):
    norms = InputNorms(COLS)
    norms.add(x)
    assert not torch.equal(wanda_mask(w, norms.value(), 0.5), magnitude_mask(w, 0.5))


def test_counts_are_exact_even_with_ties():
    score = torch.ones(4, 12)  # every score tied
    assert int(layer_mask(score, 0.5).sum()) == 24
    assert (row_mask(score, 0.25).sum(dim=1) == 3).all()
    assert (nm_mask(score, NMPattern(2, 4)).view(4, 3, 4).sum(dim=-1) == 2).all()
    assert not layer_mask(score, 0.0).any() and not row_mask(score, 0.0).any()


def test_per_layer_threshold_lets_rows_differ():
    score = torch.cat([torch.full((1, 8), 0.1), torch.full((1, 8), 9.0)])
    assert layer_mask(score, 0.5)[0].all() and not layer_mask(score, 0.5)[1].any()
    assert (row_mask(score, 0.5).sum(dim=1) == 4).all()


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(PruningError, match=r"sparsity must be in \[0, 1\)"):
        check_target(bad)


@pytest.mark.parametrize("text,match", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                        ("2-4", "looks like 2:4"), ("a:b", "looks like 2:4")])
def test_bad_patterns_are_refused(text, match):
    with pytest.raises(PruningError, match=match):
        NMPattern.parse(text)


def test_m_must_divide_the_input_size():
    with pytest.raises(PruningError, match="does not divide the input size 10"):
        nm_mask(torch.rand(2, 10), NMPattern(2, 4))
    with pytest.raises(PruningError, match="does not divide"):
        check_target(NMPattern(2, 4), 10)
