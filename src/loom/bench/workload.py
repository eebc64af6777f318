"""The requests `loom bench throughput` submits, and the arithmetic they cost.

Two datasets:

- ``fixed`` (vLLM's "random" dataset): every prompt is ``input_len`` random token ids and every request
  generates exactly ``output_len`` tokens. Random ids keep the prefix cache from hitting.
- ``mixed``: per-request input and output lengths drawn from a long-tailed distribution, prompts of
  real text. Each length is a log-normal draw, rounded to an integer and clipped to its range
  [lo, hi]: the log-normal's median is the range's geometric mean sqrt(lo * hi) and its sigma
  ln(hi / lo) / 4, so the range's ends sit two sigmas from the median (about 2.3% of the draws are
  clipped to each end) and the mean lies above the median (the long tail of long requests). Input
  and output lengths come from two random streams seeded from ``seed`` (independent of each other,
  and the first k requests' lengths do not change with the number of requests). The prompts are
  consecutive slices of the tokenized Britannica text (eval/corpora.py), starting at token
  ``CORPUS_OFFSET`` (past the tokens that ``bench quantization`` and ``bench pruning`` score by
  default; at token 0 for a tokenizer that leaves too few tokens after it), each cut to its input length; a workload longer than the text continues from the offset
  again (``corpus_passes`` > 1 in the description). Each request generates exactly its output length,
  as vLLM's throughput benchmark honours ShareGPT's output lengths.

``workload_flops`` counts the FLOPs of a workload with loom's analysis module (``forward_ops``).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from loom.analysis.roofline import forward_ops
from loom.config import ModelConfig

DATASETS = ("fixed", "mixed")
MIXED_INPUT_RANGE = (16, 1024)
MIXED_OUTPUT_RANGE = (16, 512)
CORPUS = "britannica"
CORPUS_OFFSET = 20480


@dataclass
class Workload:
    """The prompts (token ids), each request's exact output length, and a description for the JSON."""

    prompts: list[list[int]]
    output_lens: list[int]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Total, min, median, mean and max of a list of lengths."""
    return {"total": sum(lengths), "min": min(lengths), "median": statistics.median(lengths),
            "mean": statistics.fmean(lengths), "max": max(lengths)}


def random_prompts(num: int, length: int, vocab: int, seed: int = 0, avoid: tuple[int, ...] = ()) -> list[list[int]]:
    """``num`` prompts of ``length`` token ids drawn uniformly from the vocabulary less ``avoid``."""
    rng = random.Random(seed)
    banned = set(avoid)
    pool = [t for t in range(vocab) if t not in banned]
    return [[rng.choice(pool) for _ in range(length)] for _ in range(num)]


def lognormal_parameters(lo: int, hi: int) -> dict[str, float]:
    """The clipped log-normal of a length range: mu = ln sqrt(lo * hi), sigma = ln(hi / lo) / 4."""
    if not 1 <= lo <= hi:
        raise ValueError(f"a length range needs 1 <= min <= max, got {lo}-{hi}")
    mu = 0.5 * (math.log(lo) + math.log(hi))
    sigma = math.log(hi / lo) / 4
    return {"distribution": "lognormal, rounded and clipped to [min, max]", "min": lo, "max": hi,
            "mu": mu, "sigma": sigma, "median": math.exp(mu)}


def lognormal_lengths(num: int, lo: int, hi: int, seed: str) -> list[int]:
    """``num`` lengths from ``lognormal_parameters(lo, hi)``, reproducible from ``seed``."""
    p = lognormal_parameters(lo, hi)
    rng = random.Random(seed)
    return [min(hi, max(lo, round(rng.lognormvariate(p["mu"], p["sigma"])))) for _ in range(num)]


def corpus_slices(tokens: Sequence[int], lengths: Sequence[int], offset: int = 0) -> tuple[list[list[int]], int]:
    """Consecutive slices of ``tokens[offset:]``, one per length, continuing from ``offset`` again when
    the text runs out. Returns the slices and how many passes over the text they took."""
    stream = list(tokens[offset:])
    if not stream:
        raise ValueError(f"the text has {len(tokens)} tokens, none after the offset {offset}")
    need = sum(lengths)
    passes = max(1, math.ceil(need / len(stream)))
    text = stream * passes
    out, pos = [], 0
    for n in lengths:
        out.append(text[pos:pos + n])
        pos += n
    return out, passes


def fixed_workload(num: int, input_len: int, output_len: int, vocab: int, seed: int = 0,
                   avoid: tuple[int, ...] = ()) -> Workload:
    """vLLM's random dataset: ``num`` prompts of ``input_len`` random ids, exactly ``output_len`` tokens each."""
    prompts = random_prompts(num, input_len, vocab, seed, avoid)
    outs = [output_len] * num
    return Workload(prompts, outs, {
        "dataset": "fixed", "prompts": "random token ids (special tokens excluded)", "seed": seed,
        "input_len": input_len, "output_len": output_len,
        "input_lens": length_stats([input_len] * num), "output_lens": length_stats(outs)})


def mixed_workload(num: int, tokenizer: Any, seed: int = 0, input_range: tuple[int, int] = MIXED_INPUT_RANGE,
                   output_range: tuple[int, int] = MIXED_OUTPUT_RANGE) -> Workload:
    """Long-tailed lengths and real text (see the module docstring)."""
    from loom.eval.corpora import read_corpus

    ins = lognormal_lengths(num, *input_range, seed=f"loom-mixed-input-{seed}")
    outs = lognormal_lengths(num, *output_range, seed=f"loom-mixed-output-{seed}")
    tokens = tokenizer.encode(read_corpus(CORPUS), add_special_tokens=False)
    offset = CORPUS_OFFSET if len(tokens) > CORPUS_OFFSET + input_range[1] else 0
    prompts, passes = corpus_slices(tokens, ins, offset)
    return Workload(prompts, outs, {
        "dataset": "mixed", "seed": seed,
        "prompts": f"consecutive slices of the tokenized {CORPUS} corpus from token {offset}",
        "corpus": CORPUS, "corpus_offset": offset, "corpus_tokens": len(tokens), "corpus_passes": passes,
        "input_distribution": lognormal_parameters(*input_range),
        "output_distribution": lognormal_parameters(*output_range),
        "input_lens": length_stats(ins), "output_lens": length_stats(outs)})


# FLOPs ----------------------------------------------------------------------------------------------

FLOPS_COUNTED = ("every operator of analysis.roofline.forward_ops: each prompt as one prefill forward over "
                 "its n tokens (the full n x n score rectangle, logits for the last position), then one decode "
                 "forward per generated token but the last, at its context length; divided by the workload's "
                 "input + output tokens. Padding and tokens a static batch generates past a request's own "
                 "output length are not counted")


def _forward_flops(config: ModelConfig, phase: str, n: int, l: int | None) -> float:
    return sum(o.total_flops for o in forward_ops(config, phase, n, l))  # type: ignore[arg-type]


def workload_flops(config: ModelConfig, input_lens: Sequence[int], output_lens: Sequence[int]) -> float:
    """FLOPs the model's arithmetic needs for the workload (see ``FLOPS_COUNTED``).

    A request with an n-token prompt and o output tokens costs prefill(n) + decode(l) for l = n + 1 ..
    n + o - 1 (the prefill samples the first token; each later token is one decode forward over the
    cache so far)."""
    prefill = {n: _forward_flops(config, "prefill", n, None) for n in set(input_lens)}
    longest = max(n + o - 1 for n, o in zip(input_lens, output_lens))
    cumulative = [0.0]  # cumulative[l] = decode FLOPs at contexts 1..l
    for l in range(1, longest + 1):
        cumulative.append(cumulative[-1] + _forward_flops(config, "decode", 1, l))
    return sum(prefill[n] + cumulative[n + o - 1] - cumulative[n] for n, o in zip(input_lens, output_lens))
