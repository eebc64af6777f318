"""A separate draft model with its own paged KV cache.

Each target sequence has a shadow sequence on the draft side: the same tokens, its own block table and
its own count of tokens whose K/V the draft cache holds. A proposal for k tokens runs k batched draft
forwards: the first catches the draft up on every token it has not seen (the whole prompt the first
time, then the one to two tokens the last verification added) and drafts x_1; each later one feeds
x_i and drafts x_{i+1} (one token per sequence: a decode step of the draft's own runner). After verification the
shadow keeps the K/V of the tokens the target accepted and gives back the blocks past them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence as Seq

import torch

from loom.config import CacheConfig
from loom.engine.block_manager import BlockManager
from loom.engine.kv_cache import KVCache
from loom.engine.runner import ModelRunner
from loom.engine.scheduler import ScheduledSeq
from loom.engine.sequence import Sequence, SequenceStatus
from loom.engine.speculative.distributions import choose_draft_token
from loom.engine.speculative.rejection import Draft
from loom.models.transformer import Transformer
from loom.sampling_params import SamplingParams

_SHADOW_PARAMS = SamplingParams(temperature=0.0)  # the runner only reads prompt_logprobs (None) from it


class DraftModelProposer:
    def __init__(self, draft: Transformer, num_blocks: int, block_size: int, target_vocab: int,
                 eos_token_ids: Seq[int], decode_step: str = "auto") -> None:
        """``decode_step``: as the target's runner, except that a step the draft cannot take falls back to
        the fastest it can ("auto")."""
        if draft.config.vocab_size != target_vocab:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the "
                             f"target's ({target_vocab}): they must share a tokenizer")
        self.model = draft
        self.kv_cache = KVCache.from_config(draft.config, CacheConfig(block_size=block_size, num_blocks=num_blocks),
                                            draft.dtype, draft.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(draft, self.kv_cache, "module" if decode_step == "module" else "auto")
        self.eos_token_ids = tuple(eos_token_ids)
        self.shadows: OrderedDict[int, Sequence] = OrderedDict()  # least recently drafted for first

    def _shadow(self, seq: Sequence) -> Sequence:
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq_id=seq.seq_id, request_id=seq.request_id, index=seq.index, tokens=[],
                              prompt_len=seq.prompt_len, params=_SHADOW_PARAMS, arrival=seq.arrival,
                              text=None, status=SequenceStatus.RUNNING)  # type: ignore[arg-type]
            self.shadows[seq.seq_id] = shadow
        self.shadows.move_to_end(seq.seq_id)
        shadow.tokens = list(seq.tokens)
        return shadow

    def _make_room(self, shadow: Sequence, num_tokens: int, keep: set[int]) -> bool:
        """Free the draft K/V of the least recently drafted sequences outside ``keep`` until ``shadow``
        can hold ``num_tokens`` more tokens (an evicted sequence is prefilled again when it next drafts)."""
        victims = (s for sid, s in self.shadows.items() if sid not in keep and s.block_table)
        while not self.blocks.can_allocate(shadow, num_tokens):
            victim = next(victims, None)
            if victim is None:
                return False
            self.blocks.free(victim)
            victim.num_computed = 0
        return True

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active: list[int] = []
        batch = {seq.seq_id for seq in seqs}
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            shadow = self._shadow(seq)
            todo = shadow.num_tokens - shadow.num_computed + k - 1  # catch up, then feed x_1..x_{k-1}
            if k > 0 and self._make_room(shadow, todo, batch):
                self.blocks.allocate(shadow, todo)
                active.append(i)
        step = 0
        while active:
            batch = [ScheduledSeq(self.shadows[seqs[i].seq_id], 1 if step else
                                  self.shadows[seqs[i].seq_id].num_tokens - self.shadows[seqs[i].seq_id].num_computed)
                     for i in active]
            out = self.runner.execute(batch)
            logits = out.logits.cpu()
            for row, i in enumerate(active):
                shadow = self.shadows[seqs[i].seq_id]
                shadow.num_computed += batch[row].num_tokens
                token, q = choose_draft_token(logits[row], seqs[i], drafts[i].tokens, self.eos_token_ids)
                drafts[i].tokens.append(token)
                shadow.tokens.append(token)
                if q is not None:
                    probs[i].append(q)
            step += 1
            active = [i for i in active if len(drafts[i]) < ks[i]]
        for draft, qs in zip(drafts, probs):
            if qs:
                draft.probs = torch.stack(qs)
        return drafts

    def rollback(self, seq: Sequence, num_valid: int) -> None:
        """Keep the draft K/V of the first ``num_valid`` tokens of ``seq`` (those the target kept)."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is not None:
            shadow.num_computed = min(shadow.num_computed, num_valid)
            self.blocks.trim(shadow)

    def release(self, seq: Sequence) -> None:
        shadow = self.shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.blocks.free(shadow)

    @property
    def num_used_blocks(self) -> int:
        return self.blocks.num_used_blocks
