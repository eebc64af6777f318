"""Speculative decoding inside continuous batching.

One engine step with speculation:

1. The scheduler gives every decoding sequence that may speculate 1 + k token slots (its last token
   and k drafts, k capped by the step's token budget, max_tokens and the context) and reserves
   their KV blocks; sequences that prefill or cannot speculate run as usual in the same batch.
2. ``Speculator.propose`` fills in the drafts (n-gram lookup, a draft model, or the target's own
   weights over a short window); fewer than k is fine, none means a plain decode.
3. The target computes all 1 + k positions in the step's one forward.
4. ``Speculator.verify`` runs the rejection sampler (rejection.py) on each sequence: m drafts kept
   plus one token of the target's own. The engine appends them, counts the K/V of the last token
   and the m kept drafts as computed, and gives back the blocks past them (``BlockManager.trim``);
   the draft model's cache rolls back the same way.

Greedy outputs equal plain decoding's; sampled outputs follow the same distribution.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from loom.config import SpeculativeConfig
from loom.engine.runner import ModelRunner
from loom.engine.scheduler import ScheduledSeq
from loom.engine.sequence import Sequence
from loom.engine.speculative.distributions import target_choices
from loom.engine.speculative.draft import DraftModelProposer
from loom.engine.speculative.ngram import ngram_lookup
from loom.engine.speculative.rejection import Draft, accept_greedy, rejection_sample
from loom.engine.speculative.window import WindowProposer
from loom.models.transformer import Transformer


def expected_tokens_per_pass(a: float, k: int) -> float:
    """Tokens one target pass yields when each of k drafts is accepted independently with
    probability a: 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) (Leviathan et al., eq. 1)."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class SpeculativeStats:
    """Counts over every verification pass (one speculating sequence in one target forward)."""

    passes: int = 0
    draft_tokens: int = 0  # tokens proposed and verified
    accepted_tokens: int = 0
    rejections: int = 0  # passes that ended at a rejected draft (the others kept all of theirs)
    emitted_tokens: int = 0  # accepted drafts + the target's own token, per pass
    draft_seconds: float = 0.0  # time spent proposing
    passes_by_k: Counter = field(default_factory=Counter)  # passes per number of drafts
    # Decode-only steps (no prefill in the batch), timed whole (drafting included), split by whether any
    # sequence verified drafts; their tokens per second give the speedup over plain decoding as it
    # happens (plain steps occur naturally: no n-gram match, or a request's last token).
    spec_step_seconds: float = 0.0
    spec_step_tokens: int = 0
    plain_step_seconds: float = 0.0
    plain_step_tokens: int = 0

    def record_step(self, seconds: float, tokens: int, speculated: bool) -> None:
        if speculated:
            self.spec_step_seconds += seconds
            self.spec_step_tokens += tokens
        else:
            self.plain_step_seconds += seconds
            self.plain_step_tokens += tokens

    @property
    def speedup(self) -> float | None:
        """Tokens/s of decode steps that verified drafts over tokens/s of those that did not (None until
        both kinds occurred; meaningful when their batch sizes are alike, e.g. one request at a time)."""
        if not (self.spec_step_seconds and self.plain_step_seconds and self.plain_step_tokens):
            return None
        return (self.spec_step_tokens / self.spec_step_seconds) / (self.plain_step_tokens / self.plain_step_seconds)

    @property
    def acceptance_rate(self) -> float:
        """Per-position acceptance a: accepted / positions evaluated (drafts after a rejection are
        never evaluated, so accepted / proposed would understate a)."""
        evaluated = self.accepted_tokens + self.rejections
        return self.accepted_tokens / evaluated if evaluated else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted / proposed (vLLM's 'draft acceptance rate')."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted_tokens / self.passes if self.passes else 0.0

    @property
    def expected_tokens_per_pass(self) -> float:
        """What (1 - a^(k+1)) / (1 - a) predicts from the measured a, averaged over the passes' k."""
        if not self.passes:
            return 0.0
        a = self.acceptance_rate
        return sum(n * expected_tokens_per_pass(a, k) for k, n in self.passes_by_k.items()) / self.passes

    def as_dict(self) -> dict[str, float]:
        return {"passes": self.passes, "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "rejections": self.rejections, "acceptance_rate": round(self.acceptance_rate, 4),
                "draft_acceptance_rate": round(self.draft_acceptance_rate, 4),
                "tokens_per_pass": round(self.tokens_per_pass, 4),
                "expected_tokens_per_pass": round(self.expected_tokens_per_pass, 4),
                "draft_seconds": round(self.draft_seconds, 4),
                "speedup_in_engine": None if self.speedup is None else round(self.speedup, 4)}


def load_draft_model(config: SpeculativeConfig, device: torch.device) -> Transformer:
    """The draft model, on the target's device."""
    if isinstance(config.draft_model, Transformer):
        if config.draft_model.device != device:
            raise ValueError(f"the draft model is on {config.draft_model.device}, the target on {device}")
        return config.draft_model
    from loom.weights.loader import choose_weights, load_model

    weights, dtype = choose_weights(config.draft_weights, None)
    return load_model(str(config.draft_model), dtype=dtype, weights=weights, device=device).model


class Speculator:
    def __init__(self, config: SpeculativeConfig, runner: ModelRunner, num_blocks: int,
                 eos_token_ids: Seq[int], decode_step: str = "auto") -> None:
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.stats = SpeculativeStats()
        self.drafter: DraftModelProposer | WindowProposer | None = None
        if config.method == "draft":
            self.drafter = DraftModelProposer(load_draft_model(config, runner.model.device), num_blocks,
                                              runner.block_size,
                                              runner.model.config.vocab_size, self.eos_token_ids, decode_step)
        elif config.method == "window":
            self.drafter = WindowProposer(runner, config.window, config.sink_tokens, self.eos_token_ids)

    def num_draft_tokens(self, seq: Sequence, max_model_len: int) -> int:
        """How many drafts ``seq`` may verify next: k, less what max_tokens or the context leave (a pass
        emits up to k + 1 tokens and writes K/V up to position num_tokens - 1 + k)."""
        left = min(seq.max_tokens - seq.num_output - 1, max_model_len - seq.num_tokens)
        return max(0, min(self.config.num_tokens, left))

    def propose(self, scheduled: list[ScheduledSeq]) -> None:
        """Fill in the drafts of the scheduled sequences that have draft slots; a sequence given fewer
        drafts than slots computes fewer tokens (its unused slots are given back after the step)."""
        items = [item for item in scheduled if item.num_draft > 0]
        if not items:
            return
        t0 = time.perf_counter()
        seqs, ks = [item.seq for item in items], [item.num_draft for item in items]
        if self.drafter is None:
            c = self.config
            drafts = [Draft(ngram_lookup(seq.tokens, k, c.ngram_max, c.ngram_min)) for seq, k in zip(seqs, ks)]
        else:
            drafts = self.drafter.propose(seqs, ks)
        for item, draft in zip(items, drafts):
            item.seq.draft = draft
            item.num_draft = len(draft)
            item.num_tokens = 1 + len(draft)
        self.stats.draft_seconds += time.perf_counter() - t0

    def verify(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, list[int]]:
        """The target's logits at the last token and each draft [1 + k, V] -> (drafts accepted m, the
        m + 1 tokens to append). Clears the sequence's drafts."""
        draft = seq.draft or Draft([])
        logits = logits.cpu()  # [k + 1, V]: the per-row sampling work and the request's generator are on the CPU
        choices = target_choices(logits, seq, draft.tokens, self.eos_token_ids)
        if seq.params.greedy:
            m, token = accept_greedy(choices.tolist(), draft.tokens)
        else:
            m, token = rejection_sample(choices, draft, seq.generator)
        s = self.stats
        s.passes += 1
        s.passes_by_k[len(draft)] += 1
        s.draft_tokens += len(draft)
        s.accepted_tokens += m
        s.rejections += m < len(draft)
        s.emitted_tokens += m + 1
        seq.draft = None
        return m, draft.tokens[:m] + [token]

    def rollback(self, seq: Sequence) -> None:
        """After ``seq.num_computed`` was set to the tokens the target kept: the draft cache keeps as much."""
        if isinstance(self.drafter, DraftModelProposer):
            self.drafter.rollback(seq, seq.num_computed)

    def release(self, seq: Sequence) -> None:
        """``seq`` ended (finished or aborted): the draft cache frees its blocks."""
        seq.draft = None
        if isinstance(self.drafter, DraftModelProposer):
            self.drafter.release(seq)
