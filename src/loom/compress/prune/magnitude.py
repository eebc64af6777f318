"""Magnitude pruning: zero the weights of smallest |W_ij|, one threshold per layer.

The classic baseline (Han et al. 2015; the baseline row of the SparseGPT and Wanda papers): for a
target s, a layer's int(s * numel) weights of smallest magnitude are zeroed, whichever rows they are
in; with an N:M pattern, the N smallest of every M consecutive inputs of each row. No data.
"""

from __future__ import annotations

import torch

from loom.compress.prune.masks import Target, select


def magnitude_mask(w: torch.Tensor, target: Target) -> torch.Tensor:
    """Pruned positions of ``w`` [N, K]: score |W_ij|, selected per layer (or N:M)."""
    return select(w.abs(), target, per_row=False)
