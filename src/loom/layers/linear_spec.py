"""How a linear's weight is held for its kernel: ``LinearKind`` (the format) and ``LinearSpec`` (the tensors).

``apply_linear`` (quantized.py) dispatches on the kind; the compiled decode step (engine/step/scripted.py)
takes every layer's specs as arguments, so TorchScript compiles these types: this module has no
``from __future__ import annotations``, which would turn the NamedTuple's fields into strings that
TorchScript cannot resolve.
"""

import enum
from typing import List, NamedTuple

import torch


class LinearKind(enum.Enum):
    """The format a linear's weight is held in, which decides the kernel ``apply_linear`` runs."""

    DENSE = 0  # a plain weight [out, in]: x W^T by BLAS
    LOOM = 1  # loom's int4 / int8 group-wise codes: native/quant_gemm.cpp
    TORCH_INT4 = 2  # torch's CPU int4pack layout (bf16 activations)
    TORCH_INT8 = 3  # torch's int8pack layout, per-channel scales
    W8A8 = 4  # int8 weights x int8 activations (torch._int_mm)
    REFERENCE = 5  # dequantize, then an fp32 matmul: the definition
    TORCH_INT4_CUDA = 6  # tinygemm's CUDA layout (cuda_quant.py)
    DENSE_PACKED = 7  # a dense weight plus MKL's copy packed for products of exactly ``rows`` rows
    ONEDNN = 8  # a dense bf16 weight reordered once into oneDNN's blocked layout (AMX / AVX512-BF16 GEMMs)
    ONEDNN_W8A8 = 9  # int8 weights in oneDNN's layout x int8 activations quantized per row (AMX-INT8 / VNNI)


class LinearSpec(NamedTuple):
    """One linear's weight in the form its kernel reads: what ``apply_linear`` takes.

    tensors: the kernel's tensors (DENSE: [W]; LOOM / REFERENCE: [codes, scales, offsets]; torch's kinds:
    [packed codes, scales]; W8A8: [int8 W, scales]; DENSE_PACKED: [W, MKL-packed W]; ONEDNN: [the reordered W
    (an opaque mkldnn tensor), and the bias if the layer has one: oneDNN adds it before rounding to bf16];
    ONEDNN_W8A8: [the packed int8 W, its fp32 scales, zero points (zeros), the fp32 bias or an empty tensor]).
    bits: the codes' container (4 or 8) for LOOM and REFERENCE. group: the quantization group size (for
    ONEDNN_W8A8: the Hadamard block applied to the inputs, 0 for none).
    rows: DENSE_PACKED's packed row count (0 for every other kind). The bias stays with the caller (but ONEDNN's).
    """

    kind: LinearKind
    tensors: List[torch.Tensor]
    bits: int
    group: int
    rows: int
