"""Self-drafting with a short context (seed 002): the target's own weights draft while attending only
to a few first tokens (attention sinks) and a recent window; the full context verifies.

The draft costs what a decode step over ``sink + window`` keys costs: the same weight bytes as the
target's step, but far fewer KV bytes. It pays where reading the KV cache dominates a step (long
contexts, small or quantized weights) and loses where the weights dominate (short contexts).

No second cache is needed. The scheduler reserved the target's slots for positions c..c+k of the
sequence (c = its last, not yet computed token); drafting writes the short-context K/V of positions
c..c+k-1 there and the verification forward overwrites all of them with the full-context ones. The
draft's view of the cache is a block table of the sink blocks followed by the window's blocks: keys
were stored after RoPE, so each keeps its true position and no re-rotation is needed.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from loom.engine.runner import ModelRunner
from loom.engine.sequence import Sequence
from loom.engine.step import DecodeBatch
from loom.engine.speculative.distributions import choose_draft_token
from loom.engine.speculative.rejection import Draft


class WindowProposer:
    def __init__(self, runner: ModelRunner, window: int, sink_tokens: int, eos_token_ids: Seq[int]) -> None:
        config = runner.model.config
        if config.position != "rope" or config.sliding_window is not None:
            raise ValueError("window self-drafting needs a RoPE model without its own sliding window "
                             f"(this one: position={config.position!r}, sliding_window={config.sliding_window})")
        self.runner = runner
        self.block_size = runner.block_size
        self.sink_blocks = -(-sink_tokens // self.block_size)
        self.window = window
        self.eos_token_ids = tuple(eos_token_ids)

    def view(self, table: Seq[int], length: int) -> tuple[list[int], int]:
        """The blocks the draft reads when the context holds ``length`` tokens, and how many key slots
        of that view are filled: the sink blocks, then the blocks of the last ``window`` tokens."""
        bs = self.block_size
        last = (length - 1) // bs
        start = max(0, length - self.window) // bs
        if start <= self.sink_blocks:
            return list(table[: last + 1]), length
        view = list(table[: self.sink_blocks]) + list(table[start: last + 1])
        return view, (len(view) - 1) * bs + length - last * bs

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        bs = self.block_size
        drafts = [Draft([]) for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for step in range(max(ks, default=0)):
            active = [i for i, k in enumerate(ks) if step < k]
            ids, positions, slots, tables, lens = [], [], [], [], []
            for i in active:
                seq = seqs[i]
                p = seq.num_computed + step
                ids.append(seq.tokens[p] if step == 0 else drafts[i].tokens[-1])
                positions.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                view, n = self.view(seq.block_table, p + 1)
                tables.append(view)
                lens.append(n)
            logits = self.runner.decode(DecodeBatch.of(ids, positions, slots, tables, lens)).cpu()
            for row, i in enumerate(active):
                token, q = choose_draft_token(logits[row], seqs[i], drafts[i].tokens, self.eos_token_ids)
                drafts[i].tokens.append(token)
                if q is not None:
                    probs[i].append(q)
        for draft, qs in zip(drafts, probs):
            if qs:
                draft.probs = torch.stack(qs)
        return drafts
