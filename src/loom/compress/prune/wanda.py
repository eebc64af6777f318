"""Wanda (Sun et al. 2023, arXiv 2306.11695): prune by weight magnitude times input activation norm.

With X the calibration inputs of a linear layer (rows = tokens), each weight is scored

    S_ij = |W_ij| * ||X_:,j||_2

and, per output row i, the int(s * K) weights of lowest S_ij are zeroed (the comparison group is the
row: each output keeps the same number of inputs). With an N:M pattern, the N lowest of every M
consecutive inputs. No weight update, no second-order information: one pass over the data.
"""

from __future__ import annotations

import torch

from loom.compress.prune.masks import Target, select


class InputNorms:
    """Running ||X_:,j||_2 over calibration tokens: the sum of squares per input channel (fp64)."""

    def __init__(self, in_features: int) -> None:
        self.squares = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        self.squares += x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)

    def value(self) -> torch.Tensor:
        return self.squares.sqrt()


def wanda_score(w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X_j||_2, broadcast over rows."""
    return w.double().abs() * norms.double()[None, :]


def wanda_mask(w: torch.Tensor, norms: torch.Tensor, target: Target) -> torch.Tensor:
    """Pruned positions of ``w`` [N, K]: the lowest Wanda scores of each row (or N:M)."""
    return select(wanda_score(w, norms), target, per_row=True)
