"""The rejection sampler of speculative sampling (Leviathan et al. 2211.17192, Chen et al. 2302.01318).

A proposer drafted tokens x_1..x_k, x_i drawn from q_i (its own next-token distribution given the
tokens before it). The target, in one forward, gives p_1..p_{k+1} at the same positions. Then for
i = 1..k:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i));
    at the first rejection, draw the token from norm(max(0, p_i - q_i)) and stop;

and when all k are accepted, draw a bonus token from p_{k+1}. Every emitted token then follows p
exactly: P(emit x at position i) = min(p, q)(x) + (1 - sum min(p, q)) * norm(max(0, p - q))(x)
= p(x). A deterministic proposer (n-gram lookup, or greedy drafting) is the case q_i = one-hot(x_i):
x_i is kept with probability p_i(x_i), and a rejection draws from p_i with x_i removed.

With a greedy target (temperature 0) p_i is one-hot at argmax: drafts are kept while they equal the
target's argmax, and the first disagreement is replaced by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from loom.engine.sampler import draw


@dataclass
class Draft:
    """Proposed tokens and, when they were sampled, the distributions they were sampled from."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [k, V]: q_i; None: chosen deterministically (q_i one-hot)

    def __len__(self) -> int:
        return len(self.tokens)


def accept_greedy(target_tokens: Sequence[int], draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: ``target_tokens`` are the target's argmax at the k + 1 positions.
    Returns (drafts accepted m, the token that follows them: the target's own at position m)."""
    m = 0
    while m < len(draft) and draft[m] == target_tokens[m]:
        m += 1
    return m, int(target_tokens[m])


def rejection_sample(p: torch.Tensor, draft: Draft, generator: torch.Generator | None) -> tuple[int, int]:
    """``p`` [k + 1, V]: the target's sampling distributions at the k + 1 positions (after penalties,
    temperature and filters, exactly as plain sampling would use them). Returns (drafts accepted m,
    the token that follows them: the resampled one at the first rejection, else the bonus token)."""
    k = len(draft)
    assert p.shape[0] == k + 1, f"need k + 1 = {k + 1} target distributions, got {p.shape[0]}"
    if k:
        u = torch.rand(k, generator=generator, dtype=torch.float64).tolist()
    for i, x in enumerate(draft.tokens):
        px = float(p[i, x])
        qx = 1.0 if draft.probs is None else float(draft.probs[i, x])
        if u[i] * qx < px:  # accept with probability min(1, px / qx)
            continue
        if draft.probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft.probs[i]).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: nothing left to correct
            residual = p[i]
        return i, draw(residual, generator)
    return k, draw(p[k], generator)
