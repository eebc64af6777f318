"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 1909.08053, section 3): one rank's shard of a linear
or an embedding, and the collective that makes the shards' partial results whole.

For y = x W^T with W [out, in] cut across N ranks:

    column-parallel   rank r holds rows R_r of W (its outputs):     y[:, R_r] = x W[R_r]^T        (no collective)
    row-parallel      rank r holds columns C_r of W (its inputs):   y = sum_r x[:, C_r] W[:, C_r]^T (an all-reduce)

A column-parallel linear feeding a row-parallel one (attention's q|k|v -> o, the MLP's gate|up -> down) needs
one all-reduce per pair: the activations between them stay cut. The vocabulary-parallel embedding holds rows
[a_r, b_r) of the table: each rank looks up the ids it owns (zeros elsewhere) and an all-reduce sums them; the
vocabulary-parallel output layer computes the logits of its rows and an all-gather concatenates them.

Cutting keeps a linear's kind: a dense ``Linear`` (or a bf16 ``PackedLinear``, repacked) stays dense and a
``QuantizedLinear`` stays quantized, its codes, scales and offsets cut on quantization-group boundaries
(a row-parallel cut must fall on a group boundary: the scales of one group belong to one rank).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loom.layers.linear import Linear, PackedLinear, linear
from loom.layers.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedTensor


class ShardingError(ValueError):
    """A layer or model cannot be cut as asked (indivisible heads, a cut inside a quantization group, ...)."""


@dataclass
class CollectiveStats:
    """What this process spent in tensor-parallel collectives: seconds inside the (blocking) calls, the waits for
    slower ranks included, the number of calls and the bytes of the tensors handed to them. One per process
    (``COLLECTIVES``): rank 0 reads it to split a step into communication and the rest."""

    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.seconds += seconds
        self.calls += 1
        self.bytes += nbytes

    def snapshot(self) -> "CollectiveStats":
        return CollectiveStats(self.seconds, self.calls, self.bytes)


COLLECTIVES = CollectiveStats()


@dataclass(frozen=True)
class TPGroup:
    """This process's place among the tensor-parallel ranks: ``rank`` of ``size``; ``group`` the
    torch.distributed process group (None: the default group)."""

    rank: int
    size: int
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``x`` (in place, returned)."""
        if self.size > 1:
            t0 = time.perf_counter()
            dist.all_reduce(x, group=self.group)
            COLLECTIVES.add(time.perf_counter() - t0, x.numel() * x.element_size())
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` [T, c] side by side: [T, size * c] (equal c on every rank)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        t0 = time.perf_counter()
        dist.all_gather(parts, x.contiguous(), group=self.group)
        COLLECTIVES.add(time.perf_counter() - t0, x.numel() * x.element_size())
        return torch.cat(parts, dim=-1)


def even_split(n: int, size: int, what: str) -> int:
    """n / size, or a ShardingError naming ``what`` cannot be cut evenly."""
    if n % size:
        raise ShardingError(f"{what} ({n}) is not divisible by the tensor-parallel size {size}")
    return n // size


def _dense(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = layer.weight  # PackedLinear gives its plain matrix back (a copy)
    return weight.detach(), None if layer.bias is None else layer.bias.detach()


def _rebuild_dense(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dense linear of the same kind as ``like`` (Linear, or PackedLinear repacked) holding ``weight``.
    The tensors are copies (``clone``): a view would keep the whole original matrix alive."""
    out = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    out.weight.data = weight.contiguous().clone()
    if bias is not None:
        out.bias.data = bias.contiguous().clone()
    out.to(weight.device)
    return PackedLinear(out) if isinstance(like, PackedLinear) else out


def _check_kind(layer: nn.Module) -> None:
    if type(layer) not in (Linear, PackedLinear, QuantizedLinear):
        raise ShardingError(f"tensor parallelism cuts dense and weight-only quantized linears; "
                            f"{type(layer).__name__} (e.g. W8A8 int8 or a low-rank factorization) is not supported")


def take_rows(layer: nn.Module, rows: torch.Tensor) -> nn.Module:
    """The linear computing only outputs ``rows`` (a column-parallel shard): the same kind, those rows of its
    weight (and bias)."""
    _check_kind(layer)
    if isinstance(layer, QuantizedLinear):
        qt = layer.quantized().rows(rows.to(layer.qweight.device))
        bias = None if layer.bias is None else layer.bias.detach()[rows].clone()
        return QuantizedLinear(qt, bias, layer.requested_backend)
    weight, bias = _dense(layer)
    idx = rows.to(weight.device)
    return _rebuild_dense(layer, weight.index_select(0, idx), None if bias is None else bias.index_select(0, idx))


def take_columns(layer: nn.Module, start: int, end: int) -> nn.Module:
    """The linear reading only inputs [start, end) (a row-parallel shard), without its bias (the row-parallel
    wrapper adds it once, after the sum). A quantized weight is cut on group boundaries only."""
    _check_kind(layer)
    if isinstance(layer, QuantizedLinear):
        g = layer.group_size
        if start % g or end % g:
            raise ShardingError(f"a row-parallel cut of a quantized linear ({layer.in_features} inputs) at "
                                f"[{start}, {end}) falls inside a quantization group of {g}: use a tensor-parallel "
                                f"size whose shards hold whole groups")
        qt = layer.quantized()
        cut = QuantizedTensor(qt.codes[:, start:end].contiguous(), qt.scales[:, start // g:end // g].contiguous(),
                              qt.offsets[:, start // g:end // g].contiguous(), qt.bits, g)
        return QuantizedLinear(cut, None, layer.requested_backend)
    weight, _ = _dense(layer)
    return _rebuild_dense(layer, weight[:, start:end], None)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: rank r's columns of a linear and the sum over ranks (the bias, held by
    every rank, is added once, after the sum)."""

    def __init__(self, layer: nn.Module, tp: TPGroup) -> None:
        super().__init__()
        per_rank = even_split(layer.in_features, tp.size, "the linear's inputs")
        start = tp.rank * per_rank
        self.in_features, self.out_features = per_rank, layer.out_features
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone()
                                                                 if isinstance(layer, QuantizedLinear)
                                                                 else layer.bias.detach().clone(), requires_grad=False)
        self.inner = take_columns(layer, start, start + per_rank)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank {self.tp.rank} of {self.tp.size}, bias={self.bias is not None}"


def vocab_range(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows [start, end) of a vocabulary cut in ``size`` parts of ceil(vocab / size) (the last
    one shorter when the vocabulary does not divide)."""
    per = -(-vocab // size)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of an embedding table; ``forward`` looks up every id: the owner contributes the row,
    the others zeros, and an all-reduce gives each rank the whole embedding."""

    def __init__(self, weight: torch.Tensor, vocab: int, tp: TPGroup) -> None:
        super().__init__()
        self.start, self.end = vocab_range(vocab, tp.rank, tp.size)
        self.num_embeddings = vocab
        self.weight = nn.Parameter(weight.detach()[self.start:self.end].contiguous().clone(), requires_grad=False)
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        h = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(h)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.end}) of {self.num_embeddings}, rank {self.tp.rank} of {self.tp.size}"


class QuantizedVocabEmbedding(nn.Module):
    """``VocabParallelEmbedding`` over a quantized table's rows [start, end) (a ``QuantizedEmbedding``: tied to the
    output layer's shard, or its own rows): the owner dequantizes the row, the others contribute zeros."""

    def __init__(self, lookup: QuantizedEmbedding, vocab: int, tp: TPGroup) -> None:
        super().__init__()
        self.start, self.end = vocab_range(vocab, tp.rank, tp.size)
        if lookup.num_embeddings != self.end - self.start:
            raise ShardingError(f"the quantized embedding shard has {lookup.num_embeddings} rows, rank {tp.rank} "
                                f"owns {self.end - self.start}")
        self.num_embeddings, self.lookup, self.tp = vocab, lookup, tp

    @property
    def device(self) -> torch.device:
        return self.lookup.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        rows = self.lookup(torch.where(mine, ids - self.start, torch.zeros_like(ids)))
        return self.tp.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.end}) of {self.num_embeddings}, rank {self.tp.rank} of {self.tp.size}"


class VocabParallelHead(nn.Module):
    """The output layer's rows [start, end): each rank computes the logits of its vocabulary rows and an
    all-gather puts every rank's side by side (each rank's part padded to ceil(vocab / size) columns and the
    padding cut off). ``weight`` may be the embedding's shard (tied embeddings: one tensor for both)."""

    def __init__(self, weight: torch.Tensor, vocab: int, tp: TPGroup, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.start, self.end = vocab_range(vocab, tp.rank, tp.size)
        self.vocab, self.per_rank = vocab, -(-vocab // tp.size)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.tp = tp

    @classmethod
    def cut(cls, layer: nn.Module, vocab: int, tp: TPGroup) -> nn.Module:
        """The shard of a separate output layer: a dense one becomes this head; a quantized one keeps its kind
        (``QuantizedVocabHead``)."""
        start, end = vocab_range(vocab, tp.rank, tp.size)
        rows = torch.arange(start, end)
        if isinstance(layer, QuantizedLinear):
            return QuantizedVocabHead(take_rows(layer, rows), vocab, tp)
        _check_kind(layer)
        weight, bias = _dense(layer)
        return cls(weight[start:end].contiguous().clone(), vocab, tp,
                   None if bias is None else bias[start:end].contiguous().clone())

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(self.local_logits(x))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's logits side by side from this rank's [T, end - start] (a compiled step's local product)."""
        return gather_vocab(local, self.per_rank, self.vocab, self.tp)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.end}) of {self.vocab}, rank {self.tp.rank} of {self.tp.size}"


class QuantizedVocabHead(nn.Module):
    """A quantized output layer's rows (a ``QuantizedLinear`` shard) and the all-gather of the logits."""

    def __init__(self, inner: QuantizedLinear, vocab: int, tp: TPGroup) -> None:
        super().__init__()
        self.inner, self.vocab, self.per_rank, self.tp = inner, vocab, -(-vocab // tp.size), tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(self.inner(x))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return gather_vocab(local, self.per_rank, self.vocab, self.tp)


def gather_vocab(local: torch.Tensor, per_rank: int, vocab: int, tp: TPGroup) -> torch.Tensor:
    """Each rank's logits [T, <= per_rank] -> the whole vocabulary's [T, vocab] on every rank."""
    if local.shape[-1] < per_rank:
        local = F.pad(local, (0, per_rank - local.shape[-1]))
    return tp.all_gather_columns(local)[..., :vocab]
