"""Expected gain of speculative decoding (Leviathan et al. 2211.17192, sections 3.3-3.4; Chen et al. 2302.01318).

A draft proposes k tokens; the target checks them in one forward. With acceptance rate a (the
expected sum min(p, q)) and acceptances treated as independent, the tokens one target pass yields are

    E[tokens per step] = (1 - a^(k+1)) / (1 - a)          (k + 1 when a = 1)

and, with c the cost of a draft step relative to a target step (the target's verification pass
costed as one decode step), the walltime improvement is

    speedup = (1 - a^(k+1)) / ((1 - a) (k c + 1)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def _check(k: int, acceptance: float, cost_ratio: float = 0.0) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if cost_ratio < 0:
        raise ValueError(f"cost ratio must be >= 0, got {cost_ratio}")


def expected_tokens(k: int, acceptance: float) -> float:
    """(1 - a^(k+1)) / (1 - a): tokens per target forward (Leviathan et al., eq. 1)."""
    _check(k, acceptance)
    if acceptance == 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def speedup(k: int, acceptance: float, cost_ratio: float) -> float:
    """(1 - a^(k+1)) / ((1 - a)(k c + 1)) (Leviathan et al., theorem 3.8)."""
    _check(k, acceptance, cost_ratio)
    return expected_tokens(k, acceptance) / (k * cost_ratio + 1.0)


def best_k(acceptance: float, cost_ratio: float, k_max: int = 64) -> int:
    """The k in 0..k_max with the largest speedup (the smallest on ties)."""
    return max(range(k_max + 1), key=lambda k: (speedup(k, acceptance, cost_ratio), -k))


@dataclass
class SpeculativeEstimate:
    k: int
    acceptance: float
    cost_ratio: float
    expected_tokens_per_step: float
    speedup: float
    best_k: int
    best_speedup: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(k: int, acceptance: float, cost_ratio: float, k_max: int = 64) -> SpeculativeEstimate:
    kb = best_k(acceptance, cost_ratio, k_max)
    return SpeculativeEstimate(k, acceptance, cost_ratio, expected_tokens(k, acceptance),
                               speedup(k, acceptance, cost_ratio), kb, speedup(kb, acceptance, cost_ratio))
