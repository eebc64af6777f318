"""Iteration-level scheduling (Orca, Yu et al. OSDI'22) with chunked prefill and preemption.

Every step the scheduler decides afresh which sequences compute how many tokens:

1. Running sequences first, oldest first: a decoding sequence needs one token, a prefilling one the
   rest of its prompt (cut to the step's token budget when chunked prefill is on). If the blocks
   for that do not exist, the newest running sequence is preempted (its blocks freed, its K/V to be
   recomputed later), repeatedly, down to the sequence itself.
2. Then waiting sequences in order of arrival (preempted ones first, since they arrived earlier),
   while the token budget, ``max_num_seqs`` and the free blocks allow; none if this step preempted.
   A sequence whose LoRA adapter finds no slot (all ``max_loras`` pinned by running sequences under
   other adapters) stays first in line while later ones are admitted.

Nothing is lost in a preemption: the sequence keeps its tokens and recomputes their K/V (with the
prefix cache often finding most of them still cached).

With speculative decoding a decoding sequence asks for 1 + k tokens (its last token and k draft
slots, ``draft_tokens(seq)``). k is a function of the sequence alone: if 1 + k tokens do not fit
this step's remaining budget the sequence waits for the next step, and missing blocks are found by
preemption as for any other allocation.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from loom.config import SchedulerConfig
from loom.engine.block_manager import BlockManager
from loom.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from loom.engine.adapters import AdapterPool


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed (drafts included)
    num_draft: int = 0  # of which draft tokens (speculative decoding), after the sequence's last token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies to do first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _tokens_to_compute(seq: Sequence) -> int:
    """The rest of the sequence's tokens. A bounded sequence (KV eviction) has room for only
    ``prefill_chunk`` tokens beyond its budget, and what it keeps depends on how its tokens were
    grouped into steps; so it always takes its prompt in chunks of ``prefill_chunk`` and its generated
    tokens one per step, also when recomputing after a preemption, and waits for a step with room for
    the whole chunk: its outputs are then the same alone, in any batch, and after a preemption."""
    n = seq.num_tokens - seq.num_computed
    if seq.eviction is None:
        return n
    if seq.num_computed < seq.prompt_len:
        return min(seq.prompt_len - seq.num_computed, seq.eviction.policy.prefill_chunk)
    return 1


def _order(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival, seq.seq_id)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 draft_tokens: Callable[[Sequence], int] | None = None, adapters: AdapterPool | None = None) -> None:
        """``adapters``: the LoRA slots (engine/adapters.py); a running sequence pins its adapter's slot, and a
        waiting one whose adapter finds no free slot lets later ones (other adapters, the base model) go first."""
        self.config = config
        self.adapters = adapters
        self.blocks = block_manager
        self.draft_tokens = draft_tokens  # speculative decoding: drafts a decoding sequence may verify
        self.waiting: deque[Sequence] = deque()  # kept in arrival order
        self.running: list[Sequence] = []  # kept in arrival order
        self.num_preemptions = 0

    # Queues -----------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if not self.waiting or _order(self.waiting[-1]) <= _order(seq):
            self.waiting.append(seq)
        else:  # a preempted (older) sequence goes back to its place by arrival
            keys = [_order(s) for s in self.waiting]
            self.waiting.insert(bisect.bisect(keys, _order(seq)), seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence starts running (an admitted one, or a fork, which joins right behind its parent: same
        arrival); it pins its adapter's slot."""
        if seq.adapter is not None:
            seq.lora_slot = self.adapters.acquire(seq.adapter)  # type: ignore[union-attr]
        seq.status = SequenceStatus.RUNNING
        keys = [_order(s) for s in self.running]
        self.running.insert(bisect.bisect(keys, _order(seq)), seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self._unpin(seq)

    def _unpin(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.adapters.release(seq.adapter)  # type: ignore[union-attr, arg-type]
            seq.lora_slot = None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        self.running.remove(seq)
        self._unpin(seq)
        self.add(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # The step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = _tokens_to_compute(seq)
            if n > budget and (not chunked or seq.eviction is not None):
                continue
            n = min(n, budget)
            k = 0
            if n == 1 and self.draft_tokens is not None:
                # k depends on the sequence alone, never on the batch: a seeded request must sample the
                # same tokens in a busy batch as alone, and its random draws depend on k.
                k = min(self.draft_tokens(seq), self.config.max_num_batched_tokens - 1)
                if 1 + k > budget:
                    continue  # next step, first in line
                n += k
            while not self.blocks.can_allocate(seq, n):
                if queue:
                    self._preempt(queue.pop(), out)  # the newest running sequence
                elif k and self.blocks.can_allocate(seq, 1):
                    n, k = 1, 0  # nobody left to preempt: decode without drafts rather than stall
                else:
                    self._preempt(seq, out)
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            out.copies += self.blocks.allocate(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n, k))
            budget -= n
        if out.preempted:
            return out
        held: list[Sequence] = []  # waiting for an adapter slot: later sequences may go first
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter is not None and not self.adapters.can_acquire(seq.adapter):  # type: ignore[union-attr]
                held.append(self.waiting.popleft())
                continue
            if not seq.block_table and seq.params.prompt_logprobs is None:  # those need every prompt logit
                self.blocks.match_prefix(seq)
            n = _tokens_to_compute(seq)
            if n > budget and (not chunked or seq.eviction is not None):
                break
            n = min(n, budget)
            if not self.blocks.can_allocate(seq, n):
                self.blocks.free(seq)  # give back prefix-cache hits until it can start
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.add_running(seq)
            out.copies += self.blocks.allocate(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(held))
        return out
