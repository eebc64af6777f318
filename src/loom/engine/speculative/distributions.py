"""The per-position distributions speculative decoding needs, computed exactly as plain sampling would.

Position i of a speculating sequence is sampled, in plain decoding, after the drafts before it were
emitted; penalties and the min_tokens ban look at those tokens. So both the target's p_i and the
draft's q_i are built from a ``SamplingRow`` whose output includes drafts[:i].
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from loom.engine.sampler import SamplingRow, draw, processed_logits, sampling_distribution
from loom.engine.sequence import Sequence


def sampling_row(seq: Sequence, drafted: Seq[int], eos_token_ids: Seq[int]) -> SamplingRow:
    """The row plain sampling would use after ``drafted`` more tokens of ``seq``."""
    p = seq.params
    history = p.has_penalties
    output = seq.output_ids + list(drafted) if history or p.min_tokens else ()
    return SamplingRow(p, seq.prompt_ids if history else (), output, seq.generator, eos_token_ids)


def is_plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing that changes the logits: the raw argmax decides."""
    p = seq.params
    return p.greedy and not p.has_penalties and not p.logit_bias and not p.min_tokens


def target_choices(logits: torch.Tensor, seq: Sequence, draft: Seq[int],
                   eos_token_ids: Seq[int]) -> torch.Tensor:
    """The target at the k + 1 verified positions: for a greedy sequence, its tokens [k + 1]; else its
    sampling distributions [k + 1, V]."""
    if is_plain_greedy(seq):
        return torch.argmax(logits, dim=-1)
    rows = [processed_logits(logits[i], sampling_row(seq, draft[:i], eos_token_ids)) for i in range(logits.shape[0])]
    if seq.params.greedy:
        return torch.stack([torch.argmax(r) for r in rows])
    return torch.stack([sampling_distribution(r, seq.params) for r in rows])


def choose_draft_token(logits: torch.Tensor, seq: Sequence, drafted: Seq[int],
                       eos_token_ids: Seq[int]) -> tuple[int, torch.Tensor | None]:
    """A drafting model's next token for ``seq`` after ``drafted``: its argmax for greedy sequences
    (q one-hot), else a draw from its own distribution q under the request's sampling parameters,
    returned with q (the rejection sampler needs the exact distribution the draft sampled from)."""
    if is_plain_greedy(seq):
        return int(torch.argmax(logits)), None
    out = processed_logits(logits, sampling_row(seq, drafted, eos_token_ids))
    if seq.params.greedy:
        return int(torch.argmax(out)), None
    q = sampling_distribution(out, seq.params)
    return draw(q, seq.generator), q
