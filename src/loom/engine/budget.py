"""Which weights stay in memory under a memory budget, and which stream from the model file (seed 002).

Everything that every forward needs at once, or that is small and hot, is resident first: the embedding, the
output layer and the final norm (``base``), the KV cache, and the draft model of speculative decoding with its
own KV cache. Streaming then needs ``buffers`` built layers at once (one computing, the next being read) and
the read buffers layers' bytes land in (two: one is read into while the other fills a buffer). Whatever is left holds decoder layers, resident from the first on;
the others stream once per forward, which costs (seed 002, analysis/offload.py)

    seconds per forward >= streamed layer bytes / storage bandwidth.

The smallest workable budget streams every layer:

    minimum = base + KV + draft + read buffer + buffers x the largest layer

(or everything resident, when that is smaller: a model of very few layers). A budget below it is refused,
naming the minimum and its parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence


class BudgetError(ValueError):
    """A memory budget too small for the smallest workable set of resident weights."""


def mb(n: float) -> str:
    """A size for people: 1.5 GB, 270.3 MB, 12.4 kB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


@dataclass
class ResidencyPlan:
    """What is resident and what streams under ``budget_bytes`` (module doc); sizes are bytes in memory,
    ``layer_file_bytes`` bytes in the file (what a pass over a streamed layer reads)."""

    budget_bytes: int
    base_bytes: int
    kv_cache_bytes: int
    draft_bytes: int
    layer_bytes: list[int]
    layer_file_bytes: list[int]
    buffers: int
    read_buffer_bytes: int
    resident_layers: list[int]
    streamed_layers: list[int]
    minimum_bytes: int

    @property
    def streaming(self) -> bool:
        return bool(self.streamed_layers)

    @property
    def planned_bytes(self) -> int:
        """Memory the plan takes: everything resident, plus the buffers and the read buffer when streaming."""
        total = self.base_bytes + self.kv_cache_bytes + self.draft_bytes
        total += sum(self.layer_bytes[i] for i in self.resident_layers)
        if self.streaming:
            total += self.read_buffer_bytes + self.buffers * max(self.layer_bytes[i] for i in self.streamed_layers)
        return total

    @property
    def streamed_bytes_per_forward(self) -> int:
        """Bytes of the file one forward reads (the streamed layers' tensors)."""
        return sum(self.layer_file_bytes[i] for i in self.streamed_layers)

    def describe(self) -> str:
        n = len(self.layer_bytes)
        text = (f"memory budget {mb(self.budget_bytes)}: resident: embedding and output layer {mb(self.base_bytes)}, "
                f"KV cache {mb(self.kv_cache_bytes)}")
        if self.draft_bytes:
            text += f", draft model and its KV cache {mb(self.draft_bytes)}"
        text += f", {len(self.resident_layers)} of {n} decoder layers {_ranges(self.resident_layers)}"
        if self.streaming:
            text += (f"; streamed: layers {_ranges(self.streamed_layers)} "
                     f"({mb(self.streamed_bytes_per_forward)} read per forward) through {self.buffers} buffers "
                     f"and {mb(self.read_buffer_bytes)} of read buffers")
        return text + f"; planned {mb(self.planned_bytes)} (minimum workable {mb(self.minimum_bytes)})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(planned_bytes=self.planned_bytes, streamed_bytes_per_forward=self.streamed_bytes_per_forward)
        return d


def _ranges(layers: Sequence[int]) -> str:
    if not layers:
        return "(none)"
    parts, start = [], layers[0]
    for prev, cur in zip(layers, list(layers[1:]) + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def plan_residency(budget_bytes: int, base_bytes: int, layer_bytes: Sequence[int], layer_file_bytes: Sequence[int],
                   kv_cache_bytes: int = 0, draft_bytes: int = 0, buffers: int = 2, read_buffer_bytes: int = 0,
                   kv_fraction: float | None = None) -> ResidencyPlan:
    """The residency plan under ``budget_bytes`` (module doc). ``kv_fraction``: the KV cache was sized as
    this fraction of the budget, so the minimum reported is the budget whose fraction still fits the rest.
    A BudgetError when not even every layer streamed fits."""
    layers = list(layer_bytes)
    if budget_bytes <= 0:
        raise BudgetError(f"the memory budget must be positive, got {budget_bytes}")
    if buffers < 2:
        raise BudgetError(f"streaming needs at least 2 layer buffers, got {buffers}")
    fixed = base_bytes + kv_cache_bytes + draft_bytes
    everything = fixed + sum(layers)
    streaming_floor = fixed + read_buffer_bytes + buffers * max(layers)
    minimum = min(everything, streaming_floor)
    if kv_fraction is not None:  # the KV cache grows with the budget: solve B = rest + fraction B
        minimum = int(-(-(minimum - kv_cache_bytes) // (1 - kv_fraction)))
    n = len(layers)
    if budget_bytes >= everything:
        resident = list(range(n))
    elif budget_bytes >= streaming_floor:
        resident = []
        for r in range(n - 1, -1, -1):  # the most leading layers that fit beside the streaming of the rest
            need = fixed + sum(layers[:r]) + read_buffer_bytes + buffers * max(layers[r:])
            if need <= budget_bytes:
                resident = list(range(r))
                break
    else:
        kv = f"KV cache {mb(kv_cache_bytes)}" + (f" ({kv_fraction:.0%} of the budget)" if kv_fraction else "")
        parts = [f"embedding and output layer {mb(base_bytes)}", kv]
        if draft_bytes:
            parts.append(f"draft model and its KV cache {mb(draft_bytes)}")
        parts.append(f"{buffers} buffers of the largest layer {mb(buffers * max(layers))}")
        parts.append(f"a read buffer {mb(read_buffer_bytes)}")
        raise BudgetError(f"memory budget {mb(budget_bytes)} is below the smallest workable set, {mb(minimum)} "
                          f"({', '.join(parts)}, every decoder layer streamed from the file); give a budget of "
                          f"at least {mb(minimum)} (--memory-budget {minimum})")
    streamed = [i for i in range(n) if i not in set(resident)]
    return ResidencyPlan(budget_bytes, base_bytes, kv_cache_bytes, draft_bytes, layers, list(layer_file_bytes),
                         buffers, read_buffer_bytes, resident, streamed, minimum)
