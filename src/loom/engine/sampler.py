"""Logits -> next tokens, one row per sequence, each row with its own SamplingParams.

Order: penalties -> logit bias -> min_tokens ban -> temperature -> top-k -> top-p -> min-p -> draw.
The draw inverts the CDF: one uniform u from the row's own generator picks the first i whose
cumulative probability exceeds u (cumulated in float64). One random number per token, so a seeded
request draws the same numbers whatever else is in the batch, and the cost is one pass over the
vocabulary (an exponential race, argmax p_i / E_i, needs V random numbers: ~5 ms per token for
SmolLM2's 49,152 on this CPU, against ~0.1 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from loom.layers.fused import argmax_rows
from loom.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None
    eos_token_ids: Sequence[int] = field(default_factory=tuple)
    constrained: bool = False  # a grammar decides where the text may end: no min_tokens ban


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> torch.Tensor:
    """In place on one row [V]."""
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)
        ids = list(prompt_ids) + list(output_ids)
        if ids:
            seen[torch.tensor(ids, dtype=torch.long).clamp_(0, vocab - 1)] = True
        r, most = params.repetition_penalty, torch.finfo(logits.dtype).max
        # clamped: a tiny r would turn l / r into inf, and softmax's inf - inf into NaN
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / r, logits[seen] * r).clamp_(-most, most)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts.float() + params.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Temperature-scaled logits of one row [V] -> the same with filtered-out tokens at -inf."""
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        drop = before >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def processed_logits(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Penalties, logit bias and the min_tokens ban applied to a copy of one row [V] (fp32)."""
    p = row.params
    out = logits.float().clone()
    if p.has_penalties:
        apply_penalties(out, p, row.prompt_ids, row.output_ids)
    if p.logit_bias:
        ids = torch.tensor([t for t in p.logit_bias if 0 <= t < out.shape[-1]], dtype=torch.long)
        if ids.numel():
            out[ids] += torch.tensor([p.logit_bias[int(t)] for t in ids], dtype=out.dtype)
    banned = _banned(row, out.shape[-1]) if p.min_tokens else []
    if banned:
        out[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    return out


def sampling_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities a non-greedy row is drawn from (after temperature and filters)."""
    scaled = logits / params.temperature
    return torch.softmax(filter_logits(scaled, params.top_k, params.top_p, params.min_p), dim=-1)


def sample_row(logits: torch.Tensor, row: SamplingRow) -> int:
    """One row of raw logits [V] -> the chosen token id."""
    out = processed_logits(logits, row)
    if row.params.greedy:
        return int(torch.argmax(out))
    return draw(sampling_distribution(out, row.params), row.generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index i with probability weights_i / sum(weights) (weights >= 0, not necessarily
    normalized; zero-weight indices are never drawn)."""
    cdf = torch.cumsum(weights.double(), dim=0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cdf[-1])
    return min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)), weights.numel() - 1)


def _banned(row: SamplingRow, vocab: int) -> list[int]:
    """Token ids the min_tokens rule forbids for this row right now."""
    p = row.params
    if row.constrained or len(row.output_ids) >= p.min_tokens:
        return []
    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(row.eos_token_ids))
    return [t for t in banned if 0 <= t < vocab]


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Raw logits [N, V] -> one token per row. Plain greedy rows (no penalties or bias) are decided
    together with one argmax (on the logits' device); the rest row by row, on the CPU (GPU logits are
    copied over once), so a seeded row draws from its CPU generator exactly as on a CPU run."""
    vocab = logits.shape[-1]
    dev = logits.device
    plain = [i for i, r in enumerate(rows) if r.params.greedy and not r.params.has_penalties
             and not r.params.logit_bias]
    out = [0] * len(rows)
    if plain:
        # The min_tokens ban is applied in place and undone after the argmax: the caller's logits (read
        # again for logprobs) come back unchanged, and no [N, V] copy is made.
        bans = [(i, torch.tensor(b, dtype=torch.long, device=dev)) for i in plain if rows[i].params.min_tokens
                for b in [_banned(rows[i], vocab)] if b]
        saved = [logits[i, b].clone() for i, b in bans]
        for i, b in bans:
            logits[i, b] = float("-inf")
        sub = logits if len(plain) == len(rows) else logits[torch.tensor(plain, dtype=torch.long, device=dev)]
        for i, token in zip(plain, argmax_rows(sub).tolist()):
            out[i] = token
        for (i, b), value in zip(bans, saved):
            logits[i, b] = value
    done = set(plain)
    rest = [i for i in range(len(rows)) if i not in done]
    if rest and dev.type != "cpu":
        host = logits[torch.tensor(rest, device=dev)].cpu()
        for j, i in enumerate(rest):
            out[i] = sample_row(host[j], rows[i])
        return out
    for i in rest:
        out[i] = sample_row(logits[i], rows[i])
    return out


def top_logprobs(logits: torch.Tensor, chosen: Sequence[int], top_n: int) -> list[list[tuple[int, float, int]]]:
    """For each row of raw logits [N, V]: (token, log p, rank) of the chosen token and the top ``top_n``.

    Log-probabilities are those of the model's own next-token distribution, log_softmax(logits),
    before penalties, temperature or filters (what OpenAI and vLLM report). Rank 1 is the most likely.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(list(chosen), dtype=torch.long, device=lp.device)
    chosen_lp = lp.gather(1, idx[:, None])[:, 0]
    ranks = ((lp > chosen_lp[:, None]).sum(dim=-1) + 1).cpu()
    top = torch.topk(lp, top_n, dim=-1) if top_n > 0 else None
    chosen_lp = chosen_lp.cpu()
    if top is not None:
        top = (top.values.cpu(), top.indices.cpu())
    out = []
    for i, token in enumerate(chosen):
        row = [(int(token), float(chosen_lp[i]), int(ranks[i]))]
        if top is not None:
            for r, (v, t) in enumerate(zip(top[0][i].tolist(), top[1][i].tolist())):
                if t != token:
                    row.append((t, v, r + 1))
        out.append(row)
    return out
