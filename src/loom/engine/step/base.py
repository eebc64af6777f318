"""The decode-step interface: one new token for each of B sequences in, fp32 logits [B, vocab] out.

A decode step is the whole model forward of a batch whose every row is one new token (a decoding
sequence, or a draft being verified): embed, then per layer norm -> q|k|v -> RoPE -> write K/V at
the row's slot -> attend over the row's blocks -> o -> residual -> norm -> gate|up -> SwiGLU -> down
-> residual, then the final norm and the output layer. loom computes it several ways (module.py,
scripted.py, native.py, cuda_graph.py), each fastest somewhere; the runner holds the ones that take
the model and gives each batch to the first that supports it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch


@dataclass(frozen=True)
class DecodeBatch:
    """One new token per row, everything explicit (host tensors, int64).

    tokens, positions, slots, context_lens: [B]; block_tables: [B, max_blocks] (padded with block 0).
    Row b's K/V is written at ``slots[b]`` before any row attends, and row b attends over the first
    ``context_lens[b]`` tokens of its block table, itself included. ``lora_slots`` [B]: each row's
    adapter slot (layers/multi_lora.py; -1 for the base model), or [4, B]: one such row per linear (q|k|v, o,
    gate|up, down; -1 also where the row's adapter leaves that linear alone); None when no row has an adapter.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    lora_slots: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def of(cls, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
           context_lens: list[int], lora_slots: list[int] | None = None) -> DecodeBatch:
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                   torch.tensor(slots, dtype=torch.long), pad_tables(tables),
                   torch.tensor(context_lens, dtype=torch.long),
                   None if lora_slots is None else torch.tensor(lora_slots, dtype=torch.long))


def pad_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables padded with block 0 to one width: [B, max_blocks]."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)


class DecodeStep(abc.ABC):
    """One way to run a decode batch. ``name`` is what ``describe()`` and the benchmarks report."""

    name: ClassVar[str]

    def supports(self, batch: DecodeBatch) -> bool:
        """Whether this step takes ``batch`` (e.g. the native step only small batches; a step built without
        adapter slots no batch with ``lora_slots``)."""
        return batch.lora_slots is None

    @abc.abstractmethod
    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        """fp32 logits [B, vocab]; writes every row's K/V into the cache."""

    def describe(self) -> str:
        return self.name
