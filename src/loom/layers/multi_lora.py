"""Many LoRA adapters in one batch: y += s_i B_i A_i x for each row under its own adapter i.

A served adapter is never merged into the base weights (Hu et al. 2021's W + s B A): the base GEMM runs
once for the whole batch, and each row adds its adapter's low-rank product (S-LoRA, Sheng et al. 2023;
Punica, Chen et al. 2023). The adapters of a linear sit in a pool of slots (``LoraWeights``); a row names
its slot (``slots[row]``, -1 for the base model). The product is two skinny steps:

    shrink:  t = x A_s^T          [rows, parts * r]   (Punica's "shrink": in -> r)
    expand:  y[:, part p] += t[:, p r:(p + 1) r] B_s[part p]^T             (r -> out)

A fused linear (q|k|v, gate|up) has one (A, B) pair per part: A's rows stack the parts' A (each padded to
the pool's rank r with zero rows), B holds each part's output rows against its own r columns, so the
expand costs out x r per row (a block-diagonal B would cost out x parts * r). The scale s is folded into B
when an adapter is loaded into a slot, and ranks below r are zero-padded (exact: the padding adds zeros).

Two kernels compute it: loom's native one (native/lora.cpp: per-adapter groups of rows, vectorized
shrink and expand inside one parallel region, for decode batches; per-adapter GEMMs for many rows,
Punica's BGMV and SGMV) and its PyTorch twin here (one GEMM pair per adapter present, any device). The
pool may be fp32 or bf16 (vLLM's ``--lora-dtype``) whatever the activations' dtype: the native kernel
computes in fp32 from the weights as stored and rounds a bf16 output once. This
module has no ``from __future__ import annotations``: TorchScript compiles its types (see linear_spec.py).
"""

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from loom.layers import fused


class LoraWeights(NamedTuple):
    """One linear's adapter slots.

    a:    [slots, parts * rank, in]: part p's A in rows [p rank, (p + 1) rank), zero-padded
    b:    [slots, out, rank]: scale * B, each output row against its own part's rank columns
    cols: [parts + 1] output column offsets of the parts (q|k|v: [0, q, q + kv, q + 2 kv])
    """

    a: torch.Tensor
    b: torch.Tensor
    cols: List[int]


class LayerLora(NamedTuple):
    """A decoder layer's four linears' slots, in the compiled steps' order."""

    qkv: LoraWeights
    o: LoraWeights
    gate_up: LoraWeights
    down: LoraWeights


def add_lora_torch(y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slots: torch.Tensor) -> torch.Tensor:
    """y[row] += expand(shrink(x[row])) under slot ``slots[row]`` (-1: nothing), in place; returns y.
    One GEMM pair per adapter present in the batch (SGMV as PyTorch ops), in the wider of x's and the
    weights' dtypes (fp32 rows with a bf16 pool: the weights are widened, exactly; all bf16: bf16 GEMMs)."""
    rank = w.b.shape[2]
    dtype = torch.promote_types(torch.promote_types(x.dtype, w.a.dtype), w.b.dtype)
    present: List[int] = torch.unique(slots).tolist()
    for s in present:
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        t = torch.mm(x.index_select(0, rows).to(dtype), w.a[s].t().to(dtype))
        for p in range(len(w.cols) - 1):
            c0, c1 = w.cols[p], w.cols[p + 1]
            d = torch.mm(t[:, p * rank:(p + 1) * rank], w.b[s, c0:c1].t().to(dtype))
            y[:, c0:c1].index_add_(0, rows, d.to(y.dtype))
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slots: torch.Tensor) -> torch.Tensor:
    """``add_lora_torch`` through loom's native kernel where it applies: CPU tensors, x and y both fp32 or both
    bf16, A and B both fp32 or both bf16 (any pairing of the two)."""
    act = x.dtype == y.dtype and (y.dtype == torch.float32 or y.dtype == torch.bfloat16)
    pool = w.a.dtype == w.b.dtype and (w.a.dtype == torch.float32 or w.a.dtype == torch.bfloat16)
    if act and pool and y.device.type == "cpu" and fused.native_ops():
        return torch.ops.loom.lora_add_(y, x, w.a, w.b, slots, w.cols)
    return add_lora_torch(y, x, w, slots)


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slots: torch.Tensor) -> torch.Tensor:
    """The definition, row by row and part by part (tests): a new tensor y + s B A x per row."""
    out = y.clone()
    rank = w.b.shape[2]
    for row in range(x.shape[0]):
        s = int(slots[row])
        if s < 0:
            continue
        for p in range(len(w.cols) - 1):
            c0, c1 = w.cols[p], w.cols[p + 1]
            a = w.a[s, p * rank:(p + 1) * rank].double()
            out[row, c0:c1] += (w.b[s, c0:c1].double() @ (a @ x[row].double())).to(y.dtype)
    return out


class LoraHooks:
    """Per-row adapters on the module path: a forward hook on each adapted linear adds its rows' products
    to the linear's output, for the rows ``slots`` names while a forward runs ``using`` them (prefill
    chunks, mixed batches, and decode batches no compiled step takes)."""

    def __init__(self, adapted: List[Tuple[nn.Module, LoraWeights, int]]) -> None:
        """``adapted``: (linear module, its slots, which row of a [kinds, rows] ``slots`` it reads)."""
        self.slots: Optional[torch.Tensor] = None
        self.handles = [module.register_forward_hook(self._hook(w, k)) for module, w, k in adapted]

    def _hook(self, w: LoraWeights, kind: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
            if self.slots is None:
                return None
            slots = self.slots[kind] if self.slots.dim() == 2 else self.slots
            x = inputs[0]
            y = output.reshape(-1, output.shape[-1])
            return add_lora(y, x.reshape(-1, x.shape[-1]), w, slots.to(y.device)).view_as(output)
        return hook

    @contextlib.contextmanager
    def using(self, slots: Optional[torch.Tensor]) -> Iterator[None]:
        """Rows of the forwards inside run under ``slots``: [rows] for every linear, or [kinds, rows] (one
        row of slots per kind of linear, -1 where a row's adapter leaves that linear alone); None: the base
        model throughout."""
        self.slots = slots
        try:
            yield
        finally:
            self.slots = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
