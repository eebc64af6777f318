"""The speed limit of generating with a model that does not fit in memory (seed 002, "Speed limit for offloading").

Every token reads every weight once, and the next token depends on this one, so whatever does not
fit must stream from storage once per token:

    latency_min = (model_size + kv_cache_size - memory_size) / storage_bandwidth
    max_speed   = 1 / latency_min

Seed 002's example: a 7.7 GB llama-2-13B, 3.5 GB of memory and UFS 3.2 storage (< 4 GB/s) give
(7.7 - 3.5) / 4 = 1.05 s per token, 0.95 tokens/s. The bound assumes the resident part stays put
(pinned); an LRU page cache swept in order each token evicts what it needs next and reads everything.
``resident_bytes`` is memory already taken by something else (a draft model, the runtime): seed 002
keeps a 3.0 GB draft in the same 3.5 GB but leaves it out of its arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loom.analysis.speculative import expected_tokens


@dataclass
class OffloadLimit:
    model_bytes: float
    kv_cache_bytes: float
    memory_bytes: float
    resident_bytes: float
    storage_bandwidth: float  # bytes per second
    streamed_bytes: float  # read from storage per token
    latency_s: float  # lower bound of seconds per token (0 when everything fits)
    tokens_per_s: float | None  # upper bound (None: storage does not limit it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offload_limit(model_bytes: float, memory_bytes: float, storage_bandwidth: float, kv_cache_bytes: float = 0.0,
                  resident_bytes: float = 0.0) -> OffloadLimit:
    """Seed 002's latency floor and maximum tokens/s when weights (and KV) overflow memory."""
    if storage_bandwidth <= 0:
        raise ValueError("storage bandwidth must be positive")
    if min(model_bytes, memory_bytes, kv_cache_bytes, resident_bytes) < 0:
        raise ValueError("sizes must be non-negative")
    streamed = max(0.0, model_bytes + kv_cache_bytes - (memory_bytes - resident_bytes))
    latency = streamed / storage_bandwidth
    return OffloadLimit(model_bytes, kv_cache_bytes, memory_bytes, resident_bytes, storage_bandwidth, streamed,
                        latency, 1.0 / latency if latency > 0 else None)


# how many tokens a resident draft proposes to a streamed target --------------------------------------

@dataclass
class SpeculationChoice:
    """The k that maximizes tokens per second when the target streams ``streamed_bytes`` per pass:

        pass_s(k)       = streamed_bytes / storage_bandwidth + target_compute_s + k draft_step_s
        tokens(k)       = (1 - a^(k+1)) / (1 - a)              (Leviathan et al. 2211.17192, eq. 1)
        tokens_per_s(k) = tokens(k) / pass_s(k)

    The target's verification of k + 1 tokens is costed as one pass: its weights are read once whatever k is,
    and on a streamed target the read dominates (``target_compute_s`` is the compute of one pass, if known)."""

    k: int
    acceptance: float
    pass_read_s: float
    draft_step_s: float
    target_compute_s: float
    expected_tokens_per_pass: float
    tokens_per_s: float
    plain_tokens_per_s: float  # k = 0: no speculation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def speculation_tokens_per_s(k: int, acceptance: float, pass_read_s: float, draft_step_s: float,
                             target_compute_s: float = 0.0) -> float:
    """tokens(k) / (read + target compute + k draft steps): the SpeculationChoice formula for one k."""
    seconds = pass_read_s + target_compute_s + k * draft_step_s
    if seconds <= 0:
        raise ValueError("a target pass must take some time: give its read seconds, compute seconds or draft step")
    return expected_tokens(k, acceptance) / seconds


def choose_speculative_tokens(streamed_bytes: float, storage_bandwidth: float, acceptance: float,
                              draft_step_s: float, target_compute_s: float = 0.0, k_min: int = 1,
                              k_max: int = 16) -> SpeculationChoice:
    """The k in k_min..k_max with the most tokens per second (the smallest on ties; SpeculationChoice)."""
    if storage_bandwidth <= 0:
        raise ValueError(f"storage bandwidth must be positive, got {storage_bandwidth}")
    if streamed_bytes < 0 or draft_step_s < 0 or target_compute_s < 0:
        raise ValueError("streamed bytes, draft step seconds and target compute seconds must be non-negative")
    if not 0 <= k_min <= k_max:
        raise ValueError(f"need 0 <= k_min <= k_max, got {k_min}, {k_max}")
    read_s = streamed_bytes / storage_bandwidth
    rate = {k: speculation_tokens_per_s(k, acceptance, read_s, draft_step_s, target_compute_s)
            for k in range(k_min, k_max + 1)}
    k = max(rate, key=lambda j: (rate[j], -j))
    return SpeculationChoice(k, acceptance, read_s, draft_step_s, target_compute_s, expected_tokens(k, acceptance),
                             rate[k], speculation_tokens_per_s(0, acceptance, read_s, draft_step_s, target_compute_s))


def acceptance_estimate(accepted_tokens: int, rejections: int, prior: float = 0.6, prior_weight: float = 2.0) -> float:
    """The per-draft acceptance a of i.i.d. acceptances from a speculator's counts: every accepted draft is a
    success, every pass that ended at a rejected draft one failure (passes that kept all their drafts were cut
    off by k, not failed), so a = accepted / (accepted + rejections), the maximum likelihood of the censored
    geometric run. ``prior`` counts as ``prior_weight`` pseudo-observations, so a short warm-up does not give
    0 or 1 exactly."""
    if accepted_tokens < 0 or rejections < 0:
        raise ValueError("counts must be non-negative")
    if not 0 <= prior <= 1 or prior_weight < 0:
        raise ValueError(f"prior must be in [0, 1] and its weight non-negative, got {prior}, {prior_weight}")
    total = accepted_tokens + rejections + prior_weight
    if total == 0:
        return prior
    return (accepted_tokens + prior * prior_weight) / total
