"""Bounded KV memory: a sequence keeps at most ``budget`` tokens' keys and values per layer.

Policies (``KVPolicyConfig``; docs/ALGORITHMS.md, "KV eviction and streaming"):

- window: the last B tokens.
- streaming (StreamingLLM, Xiao et al. 2309.17453): the first S tokens, the "attention sinks" that
  softmax dumps its unneeded mass on, plus the last B - S. Window-only attention collapses as soon as
  the first tokens leave; keeping four of them fixes it.
- h2o (H2O, Zhang et al. 2306.14048): per layer and KV head, the last r tokens plus the B - r older
  ones with the largest accumulated attention, score_j = sum over every query so far (and, under GQA,
  over the query heads that read the KV head) of softmax(q k^T)_j. New keys start with the mass their
  own step's queries give them; the recent window keeps them until they have had time to earn more.

Positions inside the cache (StreamingLLM, section 3.2): keys are stored *before* RoPE. Each step the
kept keys are gathered in sequence order and rotated by their rank 0..n-1, and the queries of the step's
new tokens sit at ranks n0..n-1 (n0 tokens kept before the step). Relative distances are then those
of a dense sequence of n tokens, never more than budget + prefill chunk, so a sequence can run far past
the model's trained context.

Paging: a bounded sequence owns ordinary blocks of the paged cache, at most ``capacity`` tokens' worth
(its kept tokens plus one step's new ones), never shared (no prefix caching, no forking). Its kept
tokens live anywhere in those slots: each (layer, KV head) has its own list of kept slots and its own
free list, so H2O can evict different tokens in different heads and the new token's K/V for a head goes
into the slot that head just freed. Memory is therefore constant once a sequence has ``capacity``
tokens, whatever it generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from loom.config import KVPolicyConfig
from loom.layers.attention import BoundedKV
from loom.layers.position import RopeTables, RotaryEmbedding


@dataclass
class KeptTokens:
    """One layer's kept tokens, per KV head, in sequence order: their slots, positions and (H2O) scores,
    each [Hkv, n]; and the head's free slots [Hkv, F]."""

    slots: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor | None
    free: torch.Tensor

    @property
    def count(self) -> int:
        return self.slots.shape[1]


class EvictingKV(BoundedKV):
    """The bounded KV state of one sequence, and attention over it (called by each attention layer through
    the ``BoundedKV`` interface of layers/attention.py)."""

    def __init__(self, policy: KVPolicyConfig, num_layers: int, num_kv_heads: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        if not policy.bounded:
            raise ValueError("EvictingKV needs a bounded policy (window, streaming or h2o)")
        self.policy = policy
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.device = torch.device(device)
        empty = torch.zeros(num_kv_heads, 0, dtype=torch.long, device=self.device)
        scores = torch.zeros(num_kv_heads, 0, device=self.device) if policy.kind == "h2o" else None
        self.layers = [KeptTokens(empty, empty, scores, empty) for _ in range(num_layers)]
        self.num_blocks = 0  # blocks of the sequence's table already handed out as free slots
        self.kept = 0  # tokens kept in every layer between steps
        self.new = 0  # tokens this step computes
        self.start = 0  # sequence position of the step's first token
        self._tables: RopeTables | None = None

    # The step ---------------------------------------------------------------------------------

    def begin_step(self, block_table: Sequence[int], start: int, num_new: int) -> range:
        """Take in the sequence's newly allocated blocks as free slots and prepare a step computing
        tokens ``start .. start + num_new - 1``. Returns their positions inside the cache (query ranks)."""
        bs = self.block_size
        if len(block_table) > self.num_blocks:
            blocks = torch.tensor(list(block_table[self.num_blocks:]), dtype=torch.long, device=self.device)
            fresh = (blocks[:, None] * bs + torch.arange(bs, device=self.device)).reshape(-1)
            fresh = fresh.expand(self.num_kv_heads, -1)
            for layer in self.layers:
                layer.free = torch.cat([layer.free, fresh], dim=1)
            self.num_blocks = len(block_table)
        if self.layers[0].free.shape[1] < num_new:
            raise RuntimeError(f"bounded KV: {num_new} new tokens but {self.layers[0].free.shape[1]} free slots")
        self.new, self.start, self._tables = num_new, start, None
        return range(self.kept, self.kept + num_new)

    def end_step(self) -> None:
        self.kept = min(self.kept + self.new, self.policy.budget)  # type: ignore[type-var]
        self.new, self._tables = 0, None

    def rank_tables(self, rotary: RotaryEmbedding, dtype: torch.dtype) -> RopeTables:
        """RoPE tables of ranks 0..n-1 (n = kept + new), built once per step and shared by the layers."""
        if self._tables is None:
            self._tables = rotary.prepare(torch.arange(self.kept + self.new, device=self.device), dtype)
        return self._tables

    # Attention --------------------------------------------------------------------------------

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding, scale: float,
               kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Attention of the step's new tokens over the kept ones and themselves, then eviction.

        q [m, Hq, D] already rotated by its ranks; k [m, Hkv, D] not rotated; v [m, Hkv, D]. The new
        K/V are stored (pre-RoPE) in each head's free slots. Returns [m, Hq, D].
        """
        state = self.layers[layer]
        m, hkv, d = k.shape
        # One row per (slot, head): row = slot * Hkv + head, so each head's tokens are one index_select.
        flat_k, flat_v = cache[0].view(-1, d), cache[1].view(-1, d)
        heads = torch.arange(hkv, device=k.device)
        dst = state.free[:, :m]  # [Hkv, m]
        new_rows = (dst.t() * hkv + heads).reshape(-1)  # token-major, as k is
        flat_k.index_copy_(0, new_rows, k.reshape(-1, d).to(flat_k.dtype))
        flat_v.index_copy_(0, new_rows, v.reshape(-1, d).to(flat_v.dtype))
        slots = torch.cat([state.slots, dst], dim=1)  # [Hkv, n]
        n = slots.shape[1]
        rows = (slots.t() * hkv + heads).reshape(-1)
        keys = flat_k.index_select(0, rows).view(n, hkv, d).to(q.dtype)  # sequence order
        values = flat_v.index_select(0, rows).view(n, hkv, d).to(q.dtype).transpose(0, 1)
        keys = rotary.apply(keys, self.rank_tables(rotary, q.dtype)).transpose(0, 1)  # [Hkv, n, D]
        qh = q.transpose(0, 1)  # [Hq, m, D]
        received = None
        if state.scores is not None:
            out, received = _attention_with_mass(qh, keys, values, scale)
        else:
            out = kernel(qh, keys, values, scale=scale)
        positions = torch.arange(self.start, self.start + m, device=k.device).expand(hkv, -1)
        scores = None
        if state.scores is not None:
            scores = torch.cat([state.scores + received[:, : state.count], received[:, state.count:]], dim=1)
        self.layers[layer] = self._evict(KeptTokens(slots, torch.cat([state.positions, positions], dim=1),
                                                    scores, state.free[:, m:]))
        return out.transpose(0, 1)

    # Eviction ---------------------------------------------------------------------------------

    def _evict(self, state: KeptTokens) -> KeptTokens:
        """Drop tokens until ``budget`` are kept; their slots join the free lists."""
        n, budget = state.count, self.policy.budget
        if n <= budget:  # type: ignore[operator]
            return state
        p = self.policy
        if p.kind in ("window", "streaming"):  # keep_indices is the sinks and a tail: slices, not gathers
            cut, tail = p.sinks, n - p.recent

            def kept(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t[:, :cut], t[:, tail:]], dim=1)

            return KeptTokens(kept(state.slots), kept(state.positions), None,
                              torch.cat([state.free, state.slots[:, cut:tail]], dim=1))
        keep = self.keep_indices(n, state.scores)  # [Hkv, budget], ascending
        dropped = torch.ones_like(state.slots, dtype=torch.bool).scatter_(1, keep, False)
        hkv = state.slots.shape[0]
        return KeptTokens(state.slots.gather(1, keep), state.positions.gather(1, keep),
                          state.scores.gather(1, keep),  # type: ignore[union-attr]
                          torch.cat([state.free, state.slots[dropped].view(hkv, -1)], dim=1))

    def keep_indices(self, n: int, scores: torch.Tensor | None) -> torch.Tensor:
        """Which of n kept-or-new tokens (in sequence order) stay: the same for every head for window and
        streaming ([budget]), per head for H2O ([Hkv, budget]); ascending, so order is preserved."""
        p = self.policy
        budget, recent = p.budget, p.recent
        assert budget is not None
        if p.kind in ("window", "streaming"):
            tail = torch.arange(n - recent, n, device=self.device)
            return torch.cat([torch.arange(p.sinks, device=self.device), tail])
        assert scores is not None
        older = n - recent
        heavy = scores[:, :older].topk(budget - recent, dim=1).indices  # the heavy hitters among the older
        tail = torch.arange(older, n, device=self.device).expand(scores.shape[0], -1)
        return torch.cat([heavy.sort(dim=1).values, tail], dim=1)


def _attention_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention (queries are the last Tq of the Tk keys) that also returns, per KV head, the
    attention mass each key received from all queries of its query-head group: ([Hq, Tq, D], [Hkv, Tk])."""
    hq, tq, _ = q.shape
    hkv, tk, _ = k.shape
    groups = hq // hkv
    kx = k.float().repeat_interleave(groups, dim=0)
    vx = v.float().repeat_interleave(groups, dim=0)
    scores = q.float() @ kx.transpose(1, 2) * scale
    visible = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tk - tq, tk, device=q.device)[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    mass = probs.sum(dim=1).view(hkv, groups, tk).sum(dim=1)
    return (probs @ vx).to(q.dtype), mass
