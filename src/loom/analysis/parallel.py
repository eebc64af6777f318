"""The communication model of tensor and data parallelism, next to the roofline's compute and memory time.

Ring all-reduce (Patarasuk and Yuan 2009) over N ranks: a reduce-scatter then an all-gather, each N - 1
steps in which every rank sends one N-th of the message to its neighbour, so each rank sends (and
receives)

    bytes moved per rank = 2 (N - 1) / N x m        over 2 (N - 1) steps,

and in the alpha-beta model (a step of s bytes costs alpha + s / beta on a ``Link``)

    t_allreduce(m, N) = 2 (N - 1) alpha + 2 (N - 1) / N x m / beta        (0 for N = 1).

An all-gather or a reduce-scatter alone is half of that: (N - 1) alpha + (N - 1) / N x m / beta.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, 1909.08053): Q/K/V and gate/up split by heads /
columns, o_proj and down_proj by rows, one all-reduce after each of the latter: 2 all-reduces per layer
of the [tokens, hidden] activations. Every operator's work splits N ways, so a decode step takes

    t(N) = t_roofline / N + 2 L x t_allreduce(tokens x hidden x act bytes, N),

t_roofline being the roofline's lower bound for the whole step on one device (``roofline.analyze``;
the attention, FFN and output layer all shard, the embedding lookup and norms are a rounding error).
Decode's messages are small (llama-2-7b, fp16: 8 KiB a token), so alpha, not beta, decides where TP
stops paying.

Data parallelism (ALGORITHMS.md, "Parallelism"): DDP all-reduces the gradients once per optimizer
step, in buckets (PyTorch's default 25 MiB, each a ring all-reduce); FSDP / ZeRO-3 all-gathers every
unit's parameters in the forward and again in the backward and reduce-scatters the gradients:
3 (N - 1) / N x the parameter bytes per rank against DDP's 2 (N - 1) / N (Rajbhandari et al. 2020).
A training step's compute is taken as 3 forwards (the backward ~2), each at the roofline; the times
are added without overlap (an upper bound; DDP overlaps buckets with the backward).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from loom.analysis.presets import Hardware, Link, Precision
from loom.analysis.roofline import analyze
from loom.config import ModelConfig

DDP_BUCKET_BYTES = 25 * 2**20  # torch DistributedDataParallel's bucket_cap_mb default


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each of ``n`` ranks sends (and receives) in a ring all-reduce of ``nbytes``."""
    _check_ranks(n)
    return 2 * (n - 1) / n * nbytes


def allreduce_time(nbytes: float, n: int, link: Link) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``n`` ranks: 2 (n-1) alpha + 2 (n-1)/n x bytes / beta."""
    _check_ranks(n)
    if n == 1:
        return 0.0
    return 2 * (n - 1) * link.latency + ring_allreduce_bytes(nbytes, n) / link.bandwidth


def gather_time(nbytes: float, n: int, link: Link) -> float:
    """Seconds of a ring all-gather (or reduce-scatter) of ``nbytes`` in all: (n-1) alpha + (n-1)/n x bytes / beta."""
    _check_ranks(n)
    return (n - 1) * link.latency + (n - 1) / n * nbytes / link.bandwidth if n > 1 else 0.0


def _check_ranks(n: int) -> None:
    if n < 1:
        raise ValueError(f"the number of ranks must be at least 1, got {n}")


@dataclass
class TPDecode:
    """One decode step under tensor parallelism over ``ranks`` devices joined by ``link``."""

    model: str
    ranks: int
    link: str
    tokens: int  # sequences decoded together (one new token each)
    context: int
    compute_s: float  # the roofline's step time / ranks
    allreduces: int  # per step
    allreduce_bytes: float  # the message: tokens x hidden x activation bytes
    moved_bytes_per_rank: float  # per all-reduce, 2 (N - 1) / N x the message
    allreduce_s: float  # one all-reduce
    comm_s: float  # all of the step's all-reduces
    step_s: float
    speedup: float  # against one device (no communication)

    @property
    def per_token_s(self) -> float:
        return self.step_s / self.tokens

    @property
    def comm_bytes_per_token(self) -> float:
        """Bytes each rank sends per generated token (all of a step's all-reduces)."""
        return self.allreduces * self.moved_bytes_per_rank / self.tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"per_token_s": self.per_token_s, "comm_bytes_per_token": self.comm_bytes_per_token,
                               "efficiency": self.speedup / self.ranks}


def tp_decode(config: ModelConfig, ranks: int, link: Link, hardware: Hardware, precision: Precision,
              tokens: int = 1, context: int = 1024) -> TPDecode:
    """The decode step of ``tokens`` sequences at ``context`` keys on ``ranks`` devices (module docstring)."""
    _check_ranks(ranks)
    one = analyze(config, "decode", tokens, context, hardware, precision).time_s
    message = tokens * config.hidden_size * precision.act
    count = 2 * config.num_layers
    each = allreduce_time(message, ranks, link)
    step = one / ranks + count * each
    return TPDecode(config.name or config.architecture, ranks, link.name, tokens, context, one / ranks, count,
                    message, ring_allreduce_bytes(message, ranks), each, count * each, step, one / step)


def tp_table(config: ModelConfig, ranks: Sequence[int], links: Sequence[Link], hardware: Hardware,
             precision: Precision, tokens: int = 1, context: int = 1024) -> list[TPDecode]:
    return [tp_decode(config, n, link, hardware, precision, tokens, context) for link in links for n in ranks]


@dataclass
class DPStep:
    """One optimizer step of data-parallel training over ``ranks`` devices joined by ``link``."""

    strategy: str
    ranks: int
    link: str
    tokens_per_rank: int
    trainable_parameters: float
    moved_bytes_per_rank: float
    comm_s: float
    compute_s: float  # 3 forwards of the rank's tokens at the roofline

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.ranks * self.tokens_per_rank / self.step_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                               "comm_bytes_per_token": self.moved_bytes_per_rank / self.tokens_per_rank}


def dp_step(config: ModelConfig, ranks: int, link: Link, hardware: Hardware, precision: Precision,
            strategy: str = "ddp", batch_per_rank: int = 1, seq_len: int = 2048,
            trainable: float | None = None) -> DPStep:
    """A step of ``batch_per_rank`` windows of ``seq_len`` per rank; gradients (and FSDP's gathered
    parameters) in the activation dtype; ``trainable`` parameters (default every weight: full fine-tuning;
    LoRA's are far fewer, and FSDP then still gathers the frozen weights)."""
    _check_ranks(ranks)
    weights = float(config.num_parameters())
    trainable = weights if trainable is None else trainable
    grad_bytes = trainable * precision.act
    if strategy == "ddp":
        buckets = max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES))
        moved = ring_allreduce_bytes(grad_bytes, ranks)
        comm = buckets * allreduce_time(grad_bytes / buckets, ranks, link)
    elif strategy == "fsdp":
        units = config.num_layers
        param_bytes = weights * precision.weight
        moved = (ranks - 1) / ranks * (2 * param_bytes + grad_bytes)
        comm = units * (2 * gather_time(param_bytes / units, ranks, link)
                        + gather_time(grad_bytes / units, ranks, link))
    else:
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    forward = batch_per_rank * analyze(config, "prefill", seq_len, seq_len, hardware, precision).time_s
    return DPStep(strategy, ranks, link.name, batch_per_rank * seq_len, trainable, moved, comm, 3 * forward)
