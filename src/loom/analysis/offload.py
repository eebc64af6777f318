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
