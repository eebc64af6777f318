"""Which weights to zero: masks chosen from a score (the lower the score, the sooner a weight goes).

A mask here is a bool tensor shaped like the weight [out_features, in_features], True where the
weight is pruned (set to zero). Three selections, every one exact in its count (ties are broken by
position, never by letting more or fewer weights through):

    per layer   the int(s * N * K) lowest scores of the whole matrix          (magnitude pruning)
    per row     the int(s * K) lowest scores of each output row                 (Wanda, 2306.11695)
    N:M         the N lowest scores of every M consecutive inputs of each row   (2:4, 4:8)

N:M follows the Wanda and SparseGPT reference code: N weights of every M are *zeroed*, so 2:4 keeps
2 of 4 (NVIDIA's sparse tensor cores' format) and 4:8 keeps 4 of 8: both are 50% sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


class PruningError(ValueError):
    """A sparsity target that cannot be met (fraction out of range, a bad N:M pattern, a shape)."""


@dataclass(frozen=True)
class NMPattern:
    """N pruned of every M consecutive inputs (``n < m``)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise PruningError(f"an N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        """``"2:4"`` -> NMPattern(2, 4)."""
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise PruningError(f"an N:M pattern looks like 2:4, got {text!r}") from None
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def check(self, in_features: int) -> None:
        if in_features % self.m:
            raise PruningError(f"N:M pattern {self}: M = {self.m} does not divide the input size {in_features}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# A sparsity target: a fraction in [0, 1) or an N:M pattern.
Target = Union[float, NMPattern]


def check_target(target: Target, in_features: int | None = None) -> None:
    """Raise ``PruningError`` unless ``target`` can be applied (to a layer with ``in_features`` inputs)."""
    if isinstance(target, NMPattern):
        if in_features is not None:
            target.check(in_features)
    elif not 0.0 <= float(target) < 1.0:
        raise PruningError(f"sparsity must be in [0, 1), got {target}")


def describe(target: Target) -> dict[str, object]:
    """How a checkpoint records the target."""
    if isinstance(target, NMPattern):
        return {"pattern": str(target), "sparsity": target.sparsity}
    return {"pattern": None, "sparsity": float(target)}


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` lowest entries along the last dimension (stable: earlier wins a tie)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        order = torch.sort(score, dim=-1, stable=True).indices
        mask.scatter_(-1, order[..., :count], True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(s * numel) lowest scores of the whole matrix (one threshold per layer)."""
    check_target(sparsity)
    return _lowest(score.flatten(), int(score.numel() * sparsity)).view(score.shape)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(s * K) lowest scores of each row [N, K] (one threshold per output)."""
    check_target(sparsity)
    return _lowest(score, int(score.shape[1] * sparsity))


def nm_mask(score: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Prune the N lowest scores of every M consecutive columns of each row [N, K]."""
    rows, k = score.shape
    pattern.check(k)
    return _lowest(score.reshape(rows, k // pattern.m, pattern.m), pattern.n).view(rows, k)


def select(score: torch.Tensor, target: Target, per_row: bool) -> torch.Tensor:
    """The mask for ``target``: N:M, or the lowest fraction per row (``per_row``) or per layer."""
    if isinstance(target, NMPattern):
        return nm_mask(score, target)
    return row_mask(score, target) if per_row else layer_mask(score, target)
