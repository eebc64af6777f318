"""Sequences (one completion each) and requests (a prompt with its n completions)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loom.config import KVPolicyConfig
from loom.engine.text_output import TextOutput
from loom.outputs import PositionLogprobs
from loom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loom.engine.adapters import Adapter
    from loom.engine.kv_policy import EvictingKV
    from loom.engine.speculative.rejection import Draft


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not started, or preempted: its KV must be (re)computed
    RUNNING = "running"  # has blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class EvictionState:
    """A sequence under a KV eviction policy (engine/kv_policy.py): the policy, and the tokens its cache
    keeps (None before its first step, after a preemption and once it ends)."""

    policy: KVPolicyConfig
    kv: EvictingKV | None = None


@dataclass(eq=False)
class Sequence:
    """One completion: its tokens, how many of them have K/V in the cache, and its block table.

    ``tokens`` is the prompt followed by the generated tokens. A step computes tokens
    ``[num_computed, num_computed + n)``; when that reaches the end of ``tokens``, the logits of the
    last one give the next token.
    """

    seq_id: int
    request_id: str
    index: int
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    arrival: float
    text: TextOutput
    generator: torch.Generator | None = None
    max_tokens: int = 0  # tokens it may generate (max_tokens, or what the context leaves)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full, computed blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Speculative decoding: tokens proposed to follow ``tokens`` this step (verified by the target in
    # the same forward as the last token), with the distributions they were sampled from.
    draft: Draft | None = None
    # KV eviction: set for a sequence whose KV memory a policy bounds.
    eviction: EvictionState | None = None
    # Constrained decoding: the llguidance matcher of a request with a structured output (engine/structured.py).
    grammar: object | None = None
    # Per-request LoRA (engine/adapters.py): the adapter, and its slot while the sequence runs (None otherwise).
    adapter: Adapter | None = None
    lora_slot: int | None = None

    @property
    def prefix_salt(self) -> tuple[str, int] | None:
        """What the prefix cache's first block name starts from: K/V computed under an adapter (one load
        of it) is found only by sequences under that same load."""
        return None if self.adapter is None else ("lora", self.adapter.uid)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def draft_tokens(self) -> list[int]:
        """This step's proposed tokens (empty when not speculating)."""
        return [] if self.draft is None else self.draft.tokens

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True until the prompt's K/V are all computed (the first token has not been sampled)."""
        return self.num_computed < self.prompt_len


@dataclass
class RequestMetrics:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    prompt_tokens_computed: int = 0  # prompt tokens actually run through the model (prefix hits excluded)
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache


@dataclass
class Request:
    """A prompt and its ``params.n`` completions. Only the first sequence prefills the prompt; the others
    fork from it when its prefill ends, sharing its KV blocks."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    aborted: bool = False

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and (len(self.seqs) == self.params.n or self.aborted)
