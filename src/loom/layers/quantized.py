"""Quantized linear layers: the same y = x W^T + b, with W stored in fewer bits.

One portable form, ``QuantizedTensor``, holds every weight-only format loom produces or loads:

    w_hat[n, k] = q[n, k] * scale[n, g] + offset[n, g],    g = k // group_size

with unsigned codes q in [0, 2^bits). It covers RTN's symmetric (offset = -2^(bits-1) scale) and
asymmetric (offset = -zero scale) grids and GGUF's blocks exactly (Q4_0: scale d, offset -8 d;
Q4_1: scale d, offset m; Q8_0: signed codes, offset 0 after the +128 shift is folded in).

``QuantizedLinear`` runs it through one of several kernels (``Backend``):
  loom       loom's native kernel: fp32 activations, weights dequantized in registers (exact up to
             summation order); codes in int4 (bits <= 4), int5 (5 bits: GGUF Q5_0 / Q5_1's own layout)
             or int8 (6..8 bits) containers, any group that is a multiple of 32 (int8: of 16). Products of more than 32 rows (batched decode, prefill) dequantize
             the weight tile by tile into bf16 and run on the matrix units (activations rounded to bf16;
             fp32 tiles on CPUs without bf16 GEMMs): ``quant_linear_tiled``
  torch      torch's kernels. CPU: ``_weight_int4pack_mm_for_cpu`` (bits <= 4, groups 32/64/128/256,
             out features divisible by 16) or ``_weight_int8pack_mm`` (8-bit symmetric per channel);
             bf16 activations and scales, as their fast paths require. CUDA: ``_weight_int4pack_mm``
             (tinygemm; layout and scales in cuda_quant.py) and ``_weight_int8pack_mm`` where the
             torch build has a CUDA kernel for it
  reference  dequantize, then an fp32 matmul: runs anywhere, the definition the others are tested against

The kernel follows the layer's device: a layer built on (or moved to) a GPU re-chooses its backend
there ("auto": torch's CUDA kernels where they take the format, else the reference) and re-packs its
codes for it; loom's own kernels are CPU code.
``W8A8Linear`` quantizes activations too (SmoothQuant's setting): per-token dynamic int8 activations
times per-channel int8 weights through ``torch._int_mm`` (int32 accumulation). ``PackedW8A8Linear`` is the
same product on the CPU's int8 matrix units: the weight held once in oneDNN's blocked layout, the
activations quantized by a native kernel (optionally after a Hadamard transform of each row).

``apply_linear`` is the one dispatch function used by the module path and by the scripted decode
step, so both run the same kernel for the same layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from loom.layers.cuda_quant import cuda_int4_problem, int4pack_cuda_tensors, int4pack_mm_cuda, int8pack_cuda_dtype
from loom.layers.linear import Linear, linear
from loom.layers.linear_spec import LinearKind, LinearSpec

BACKENDS = ("auto", "loom", "torch", "reference")
TORCH_INT4_GROUPS = (32, 64, 128, 256)


class QuantizationError(ValueError):
    """A format that a layer or kernel cannot hold (bits, group size, shape)."""


@dataclass
class QuantizedTensor:
    """Codes, scales and offsets of one weight matrix [out_features, in_features] (see module doc)."""

    codes: torch.Tensor  # uint8 [N, K], values in [0, 2^bits)
    scales: torch.Tensor  # fp32 [N, K // group_size]
    offsets: torch.Tensor  # fp32 [N, K // group_size]
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if self.group_size <= 0 or k % self.group_size:
            raise QuantizationError(f"group size {self.group_size} does not divide the input size {k}")
        if not 1 <= self.bits <= 8:
            raise QuantizationError(f"{self.bits}-bit codes are not supported (1..8)")
        want = (n, k // self.group_size)
        if tuple(self.scales.shape) != want or tuple(self.offsets.shape) != want:
            raise QuantizationError(f"scales/offsets must be {want}, got {tuple(self.scales.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.codes.to(device), self.scales.to(device), self.offsets.to(device), self.bits,
                               self.group_size)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.codes.view(n, k // self.group_size, self.group_size).float()
        return (g * self.scales.unsqueeze(-1) + self.offsets.unsqueeze(-1)).view(n, k)

    def rows(self, index: torch.Tensor | slice) -> QuantizedTensor:
        return QuantizedTensor(self.codes[index].contiguous(), self.scales[index].contiguous(),
                               self.offsets[index].contiguous(), self.bits, self.group_size)

    def widened(self, bits: int = 8) -> QuantizedTensor:
        """The same weights with ``bits``-bit codes: q + c, offset - c scale with c = 2^(bits-1) - 2^(self.bits-1),
        so a symmetric grid stays symmetric (GGUF Q5_0's (q - 16) d becomes (q + 112 - 128) d: one fused
        q|k|v from a Q5_0 q, k and a Q8_0 v). Exact: c scale is a small multiple of the scale."""
        if bits < self.bits:
            raise QuantizationError(f"cannot narrow {self.bits}-bit codes to {bits} bits")
        c = 2 ** (bits - 1) - 2 ** (self.bits - 1)
        return QuantizedTensor((self.codes.to(torch.int16) + c).to(torch.uint8), self.scales.clone(),
                               self.offsets - c * self.scales, bits, self.group_size)

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Row-wise concatenation (fused q|k|v, gate|up); parts must share bits and group size."""
        if len({(p.bits, p.group_size) for p in parts}) != 1:
            raise QuantizationError("cannot fuse tensors with different bits or group sizes")
        return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                               torch.cat([p.offsets for p in parts]), parts[0].bits, parts[0].group_size)


# Packing ---------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K/2] bytes: in each chunk of 32, byte i = q[i] | q[i + 16] << 4."""
    n, k = codes.shape
    if k % 32:
        raise QuantizationError(f"int4 packing needs the input size to be a multiple of 32, got {k}")
    c = codes.to(torch.uint8).view(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    b = packed.view(n, half // 16, 16)
    return torch.stack((b & 0x0F, b >> 4), dim=2).reshape(n, 2 * half)


def pack_int5(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..31 -> [N, K/32 x 20] bytes: per chunk of 32, the int4 pairs of the low nibbles
    (``pack_int4``) then a little-endian uint32 whose bit i is code i's fifth bit (GGUF Q5_0's qs | qh)."""
    n, k = codes.shape
    if k % 32:
        raise QuantizationError(f"int5 packing needs the input size to be a multiple of 32, got {k}")
    c = codes.to(torch.uint8)
    nibbles = pack_int4(c & 15).view(n, k // 32, 16)
    bits = ((c >> 4) & 1).view(n, k // 32, 4, 8).to(torch.int32)
    high = (bits << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)  # [n, chunks, 4] bytes
    return torch.cat((nibbles, high), dim=-1).reshape(n, k // 32 * 20).contiguous()


def unpack_int5(packed: torch.Tensor) -> torch.Tensor:
    n, row = packed.shape
    b = packed.view(n, row // 20, 20)
    low = unpack_int4(b[..., :16].reshape(n, -1).contiguous()).view(n, row // 20, 32)
    high = (b[..., 16:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1  # [n, c, 4, 8]
    return (low | (high.reshape(n, row // 20, 32) << 4)).reshape(n, -1)


def pack_container(codes: torch.Tensor, container_bits: int) -> torch.Tensor:
    """Codes [N, K] in loom's kernel container: int4 pairs, int5 nibbles + bit plane, or int8 = code - 128."""
    if container_bits == 4:
        return pack_int4(codes)
    if container_bits == 5:
        return pack_int5(codes)
    return (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)


def dequantize_kernel_weight(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int,
                             group: int) -> torch.Tensor:
    """The fp32 weight of the loom kernel's format (int4 pairs, int5 codes shifted by -16, or int8 codes
    shifted by -128)."""
    n = q.shape[0]
    if bits <= 4:
        b = q.view(n, q.shape[1] // 16, 16)
        codes = torch.stack((b & 15, b >> 4), dim=2).reshape(n, -1).float()
    elif bits == 5:
        codes = unpack_int5(q).float() - 16
    else:
        codes = q.view(torch.int8).float()
    k = codes.shape[1]
    if offsets.numel() > 0:  # the same arithmetic as QuantizedTensor.dequantize: q s + o
        return (codes.view(n, k // group, group) * scales.unsqueeze(-1) + offsets.unsqueeze(-1)).view(n, k)
    return (codes.view(n, k // group, group) * scales.unsqueeze(-1)).view(n, k)


# The one dispatch ------------------------------------------------------------------------------


def apply_linear(x: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    """y = x W^T for a weight held as ``spec`` (its kind picks the kernel); the bias is the caller's.

    One dispatch for the module path and the scripted decode step (TorchScript compiles it), so both
    run the same kernel for the same layer.
    """
    kind, t = spec.kind, spec.tensors
    if kind == LinearKind.DENSE:
        return linear(x, t[0])
    if kind == LinearKind.DENSE_PACKED:  # see packed_dense_spec
        m, rows = x.shape[0], spec.rows
        if m == rows:
            return torch.ops.mkl._mkl_linear(x, t[1], t[0], None, rows)
        if rows // 2 < m < rows:  # padded to the packed row count: still far faster than unpacked
            return torch.ops.mkl._mkl_linear(F.pad(x, (0, 0, 0, rows - m)), t[1], t[0], None, rows)[:m]
        return linear(x, t[0])
    if kind == LinearKind.ONEDNN:  # see layers/linear.py: PackedLinear; t[1], if there, is the bias
        bias: Optional[torch.Tensor] = t[1] if len(t) > 1 else None
        no_scalars: List[Optional[Union[int, float, complex]]] = []
        return torch.ops.mkldnn._linear_pointwise(x, t[0], bias, "none", no_scalars, "")
    if kind == LinearKind.LOOM:
        offsets: Optional[torch.Tensor] = t[2] if t[2].numel() > 0 else None
        if x.dim() == 2 and x.shape[0] > 32:  # compute-bound: dequantized tile by tile for the matrix units
            return torch.ops.loom.quant_linear_tiled(x, t[0], t[1], offsets, spec.bits, spec.group)
        return torch.ops.loom.quant_linear(x, t[0], t[1], offsets, spec.bits, spec.group)
    if kind == LinearKind.TORCH_INT4:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), t[0], spec.group, t[1]).to(x.dtype)
    if kind == LinearKind.TORCH_INT4_CUDA:
        return int4pack_mm_cuda(x, t[0], spec.group, t[1])
    if kind == LinearKind.TORCH_INT8:  # activations in the scales' dtype (bf16 on CPU; what the CUDA build takes)
        return torch.ops.aten._weight_int8pack_mm(x.to(t[1].dtype), t[0], t[1]).to(x.dtype)
    if kind == LinearKind.W8A8:
        return w8a8_matmul(x, t[0], t[1])
    if kind == LinearKind.ONEDNN_W8A8:  # see PackedW8A8Linear; t: packed W, its scales, zero points, bias
        qx, sx = torch.ops.loom.quantize_rows_int8(x, spec.group)
        no_args: List[Optional[Union[int, float, complex]]] = []
        acc = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 0, t[0], t[1], t[2], None, 1.0, 0, torch.float32, "none",
                                                 no_args, "")
        return torch.ops.loom.scale_rows(acc, sx, t[3], x.dtype)
    # REFERENCE: the definition in fp32, rounded to x's dtype
    return linear(x.float(), dequantize_kernel_weight(t[0], t[1], t[2], spec.bits, spec.group)).to(x.dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x ~ q * s with s = max|x_row| / 127."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s


def w8a8_matmul(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(q_x s_x)(q_w s_w)^T computed as s_x s_w (q_x q_w^T), the integer product in int32 (torch._int_mm).
    On CUDA, where torch._int_mm wants more than 16 rows (and K, N multiples of 8), fewer rows are padded
    to 17 with zero rows whose products are dropped. (17 is spelled out: TorchScript reads no module
    constants.)"""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = quantize_activations(x2)
    m = qx.shape[0]
    if qx.is_cuda and m < 17:
        pad = torch.zeros(17 - m, qx.shape[1], dtype=qx.dtype, device=qx.device)
        acc = torch._int_mm(torch.cat([qx, pad]), w_int8.t())[:m]
    else:
        acc = torch._int_mm(qx, w_int8.t())
    y = acc.float() * sx * w_scale.unsqueeze(0)
    return y.to(x.dtype).reshape(list(shape[:-1]) + [w_int8.shape[0]])


# Modules -----------------------------------------------------------------------------------------


def _native_available() -> bool:
    from loom.layers.fused import native_ops

    return native_ops()


def torch_backend_problem(qt: QuantizedTensor) -> str | None:
    """Why torch's int4/int8 kernels on the tensor's device cannot run this format, or None if they can."""
    n, k = qt.shape
    if qt.device.type == "cuda" and qt.bits <= 4:
        return cuda_int4_problem(qt)
    if qt.bits <= 4:
        if qt.group_size not in TORCH_INT4_GROUPS:
            return f"torch's int4 kernel takes groups {TORCH_INT4_GROUPS}, not {qt.group_size}"
        if n % 16:
            return f"torch's int4 kernel needs out features divisible by 16, got {n}"
        return None
    if qt.bits == 8:
        if qt.group_size != k:
            return "torch's int8 kernel takes one scale per output channel (group size = in features)"
        if not torch.equal(qt.offsets, -128.0 * qt.scales):
            return "torch's int8 kernel takes symmetric weights (offset = -128 scale)"
        if qt.device.type == "cuda" and int8pack_cuda_dtype(str(qt.device)) is None:
            return f"this torch build ({torch.__version__}) has no working CUDA kernel for _weight_int8pack_mm"
        return None
    return f"torch has no {qt.bits}-bit kernel"


def _as_fp16_if_exact(scales: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, offsets) in fp16 when both hold exactly there (loom's kernels then read half the bytes per
    group: GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 store d and m as fp16), else as they are (fp32)."""
    def exact(t: torch.Tensor) -> bool:
        h = t.half()
        return bool(torch.isfinite(h).all()) and torch.equal(h.float(), t)

    if exact(scales) and (offsets.numel() == 0 or exact(offsets)):
        return scales.half().contiguous(), offsets.half()
    return scales, offsets


def loom_backend_problem(qt: QuantizedTensor) -> str | None:
    if qt.device.type != "cpu":
        return f"loom's quantized kernels are CPU code; this weight is on {qt.device.type}"
    unit = 32 if qt.bits <= 4 else 16  # int5 / int8 groups may be half a 32-input chunk (GGUF Q6_K's sub-blocks;
    # an int5 tensor with such groups is held in the int8 container)
    if qt.group_size % unit or qt.shape[1] % 32:
        return (f"loom's kernel needs groups that are multiples of {unit} ({qt.bits}-bit codes) and inputs a "
                f"multiple of 32, got groups of {qt.group_size} over {qt.shape[1]} inputs")
    if not _native_available():
        return "the native kernels are not built (no compiler, or LOOM_NATIVE=0)"
    return None


def choose_backend(qt: QuantizedTensor, backend: str = "auto") -> str:
    """The backend that runs ``qt`` on its device: "auto" takes loom's kernel (CPU), else torch's, else the
    reference; a named backend that cannot run the format raises QuantizationError saying why."""
    backend = os.environ.get("LOOM_QUANT_BACKEND", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise QuantizationError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "loom" if loom_backend_problem(qt) is None else "torch" if torch_backend_problem(qt) is None \
            else "reference"
    problem = {"loom": loom_backend_problem, "torch": torch_backend_problem}.get(backend, lambda _: None)(qt)
    if problem:
        raise QuantizationError(problem)
    return backend


class QuantizedLinear(nn.Module):
    """y = x W_hat^T + b for a weight-only quantized W (see module doc)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.group_size = qt.bits, qt.group_size
        self.requested_backend = backend
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        # Codes in the loom kernel's containers (int4 pairs, int5 = code - 16 in nibbles and a bit plane, or
        # int8 = code - 128); scales and offsets as given, so that ``quantized()`` returns exactly what was
        # put in. Shapes that int4 / int5 cannot hold (inputs not a multiple of 32, groups of 16) use int8.
        whole_chunks = self.in_features % 32 == 0 and qt.group_size % 32 == 0
        self.container_bits = 4 if qt.bits <= 4 and whole_chunks else 5 if qt.bits == 5 and whole_chunks else 8
        self.register_buffer("qweight", pack_container(qt.codes, self.container_bits).contiguous())
        self.register_buffer("scales", qt.scales.float().contiguous())
        self.register_buffer("offsets", qt.offsets.float().contiguous())
        self._prepare_kernel(qt)

    def _prepare_kernel(self, qt: QuantizedTensor) -> None:
        """Choose the backend for the device the buffers are on and build the tensors its kernel reads."""
        self.backend = choose_backend(qt, self.requested_backend)
        self.kind = LinearKind.LOOM if self.backend == "loom" else LinearKind.REFERENCE
        self.kernel_tensors: list[torch.Tensor] = [self.qweight, *self._kernel_scales_offsets()]
        if self.backend == "torch":
            self.kind, self.kernel_tensors = self._torch_tensors(qt)

    def _kernel_scales_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and offsets loom's kernel (or the reference) reads, derived from the buffers."""
        if self.container_bits == 4:
            kernel_offsets = self.offsets
        else:  # the codes' shift (-16 for int5, -128 for int8) moves into the kernel's offset
            shift = 16.0 if self.container_bits == 5 else 128.0
            kernel_offsets = self.offsets + shift * self.scales
            if not bool(kernel_offsets.any()):  # symmetric: no offset term at all
                kernel_offsets = torch.empty(0, device=self.offsets.device)
        scales = self.scales
        if self.backend == "loom":  # GGUF's d and m are fp16: stream them so, where nothing is lost
            scales, kernel_offsets = _as_fp16_if_exact(scales, kernel_offsets)
        return scales, kernel_offsets.contiguous()

    def refresh_kernel(self) -> None:
        """The buffers (``qweight``, ``scales``, ``offsets``) were overwritten in place with another weight of
        the same format (a streamed layer's slot, weights/slots.py): derive the kernel's tensors again, into the
        tensors the kernel already reads where dtype and shape allow (a compiled step's pointers stay valid),
        exactly as a layer built from that weight would hold them."""
        if self.backend == "torch":
            self._prepare_kernel(self.quantized())
            return
        if self.backend == "loom" and _native_available() and self.scales.device.type == "cpu":
            shift = 0.0 if self.container_bits == 4 else 16.0 if self.container_bits == 5 else 128.0
            if torch.ops.loom.refresh_kernel_scales(self.scales, self.offsets, shift, self.container_bits != 4,
                                                    self.kernel_tensors[1], self.kernel_tensors[2]):
                return  # the same rules in one native pass, written into the tensors the kernel reads
        for slot, new in zip((1, 2), self._kernel_scales_offsets()):
            old = self.kernel_tensors[slot]
            if new is old:
                continue
            if old.dtype == new.dtype and old.shape == new.shape and old.data_ptr() not in \
                    (self.scales.data_ptr(), self.offsets.data_ptr()):
                old.copy_(new)
            else:
                self.kernel_tensors[slot] = new

    @classmethod
    def allocate(cls, out_features: int, in_features: int, bits: int, group_size: int, bias: bool = False,
                 backend: str = "auto") -> QuantizedLinear:
        """A layer of this format whose buffers are allocated, not yet written: the caller fills them (``load_``
        or the container's bytes directly, weights/slots.py) and then calls ``refresh_kernel``."""
        groups = in_features // group_size
        qt = QuantizedTensor(torch.empty(out_features, in_features, dtype=torch.uint8),
                             torch.empty(out_features, groups), torch.empty(out_features, groups), bits, group_size)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features, m.bits, m.group_size = out_features, in_features, bits, group_size
        m.requested_backend = backend
        m.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        whole_chunks = in_features % 32 == 0 and group_size % 32 == 0
        m.container_bits = 4 if bits <= 4 and whole_chunks else 5 if bits == 5 and whole_chunks else 8
        row = {4: in_features // 2, 5: in_features // 32 * 20, 8: in_features}[m.container_bits]
        m.register_buffer("qweight", torch.zeros(out_features, row, dtype=torch.uint8))
        m.register_buffer("scales", qt.scales.zero_())
        m.register_buffer("offsets", qt.offsets.zero_())
        m.backend = choose_backend(qt, backend)
        m.kind = LinearKind.LOOM if m.backend == "loom" else LinearKind.REFERENCE
        m.kernel_tensors = [m.qweight, m.scales, m.offsets]  # placeholders until refresh_kernel
        return m

    def load_(self, qt: QuantizedTensor, row: int = 0) -> None:
        """Overwrite rows ``row`` .. ``row + qt.shape[0]`` of the weight in place with ``qt`` (its bits, group size
        and input size this layer's; a fused weight's part), stored as ``__init__`` stores it. The caller then
        calls ``refresh_kernel`` once the whole weight is written."""
        n, k = qt.shape
        if (qt.bits, qt.group_size, k) != (self.bits, self.group_size, self.in_features) or row + n > self.out_features:
            raise QuantizationError(f"cannot load {qt.bits}-bit groups of {qt.group_size}, {n} x {k}, at row {row} "
                                    f"into {self.bits}-bit groups of {self.group_size}, "
                                    f"{self.out_features} x {self.in_features}")
        self.qweight[row:row + n].copy_(pack_container(qt.codes, self.container_bits))
        self.scales[row:row + n].copy_(qt.scales)
        self.offsets[row:row + n].copy_(qt.offsets)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """After ``.to(device)`` (or any buffer conversion) the kernel is chosen and packed again, for the
        buffers' new device: the derived tensors are not buffers and would otherwise stay behind."""
        super()._apply(fn, recurse)
        self._prepare_kernel(self.quantized())
        return self

    def _torch_tensors(self, qt: QuantizedTensor) -> tuple[LinearKind, list[torch.Tensor]]:
        if qt.bits <= 4 and qt.device.type == "cuda":
            return LinearKind.TORCH_INT4_CUDA, int4pack_cuda_tensors(qt)
        if qt.bits <= 4:
            # torch: w = (q - 8) * scale + zero  =>  zero = offset + 8 scale.
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt.codes.to(torch.int32), 1)
            sz = torch.stack((qt.scales, qt.offsets + 8.0 * qt.scales), dim=-1).transpose(0, 1)
            return LinearKind.TORCH_INT4, [packed, sz.to(torch.bfloat16).contiguous()]
        w = (qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        act = int8pack_cuda_dtype(str(qt.device)) if qt.device.type == "cuda" else torch.bfloat16
        return LinearKind.TORCH_INT8, [w, qt.scales[:, 0].to(act).contiguous()]

    def spec(self) -> LinearSpec:
        return LinearSpec(self.kind, self.kernel_tensors, self.container_bits, self.group_size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_linear(x, self.spec())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def quantized(self) -> QuantizedTensor:
        """The portable form back, exactly as it was given."""
        if self.container_bits == 4:
            codes = unpack_int4(self.qweight)
        elif self.container_bits == 5:
            codes = unpack_int5(self.qweight)
        else:
            codes = (self.qweight.view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return QuantizedTensor(codes, self.scales.clone(), self.offsets.clone(), self.bits, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def weight_bytes(self) -> int:
        """Bytes the kernel reads per use (for the bandwidth roof)."""
        return sum(t.numel() * t.element_size() for t in self.kernel_tensors)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"backend={self.backend}")


class QuantizedEmbedding(nn.Module):
    """An embedding table kept in a ``QuantizedLinear``'s codes: a lookup dequantizes only its tokens' rows
    (q s + o, the same numbers ``QuantizedLinear.dequantized_weight`` gives), in ``dtype``.

    GGUF files store a tied embedding once, quantized (SmolLM2's Q8_0, Gemma 3's Q8_0 262,144 x 640); a dense
    lookup table beside the quantized output layer is a second copy of it at 4-8x the size (Gemma 3 270M: 671
    MB of fp32). With ``tied`` the table is the output layer's own buffers, shared and not registered here (the
    model's ``lm_head`` owns them); otherwise this module owns its table (``self.table``)."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype = torch.float32, tied: bool = False) -> None:
        super().__init__()
        if tied:
            object.__setattr__(self, "_table", table)  # not a submodule: the output layer's, saved once
        else:
            self.table = table
        self.tied = tied
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = dtype

    @property
    def source(self) -> QuantizedLinear:
        return self._table if self.tied else self.table

    @property
    def device(self) -> torch.device:
        return self.source.qweight.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.source
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got {flat.min()}..{flat.max()}")
        q = t.qweight.index_select(0, flat)
        s, o = t.scales.index_select(0, flat), t.offsets.index_select(0, flat)
        n, k, g = flat.numel(), self.embedding_dim, t.group_size
        if t.container_bits == 4:
            codes = unpack_int4(q)
        elif t.container_bits == 5:
            codes = unpack_int5(q)
        else:
            codes = q.view(torch.int8).to(torch.int16) + 128
        rows = (codes.float().view(n, k // g, g) * s.unsqueeze(-1) + o.unsqueeze(-1)).view(*ids.shape, k)
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.source.bits}, "
                f"group={self.source.group_size}, tied={self.tied}")


class W8A8Linear(nn.Module):
    """int8 weights (symmetric, per output channel) x int8 activations (symmetric, per token, dynamic)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).float().clamp_min(1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(weight.float() / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)

    @classmethod
    def from_int8(cls, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> W8A8Linear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features = weight_int8.shape
        m.register_buffer("weight_int8", weight_int8.contiguous())
        m.register_buffer("weight_scale", weight_scale.float().contiguous())
        m.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        return m

    def spec(self) -> LinearSpec:
        return LinearSpec(LinearKind.W8A8, [self.weight_int8, self.weight_scale], 8, self.in_features, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w8a8_matmul(x, self.weight_int8, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def weight_bytes(self) -> int:
        return self.weight_int8.numel() + self.weight_scale.numel() * 4

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8"


def onednn_int8_available() -> bool:
    """Whether this CPU and torch build run int8 x int8 GEMMs through oneDNN (AMX-INT8 or AVX512-VNNI) and
    loom's native kernels (the activation quantizer) are built."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and _native_available())


class PackedW8A8Linear(nn.Module):
    """W8A8 on the CPU's int8 matrix units (``LinearKind.ONEDNN_W8A8``): y = x W^T + b with

        W ~ diag(s_w) Q_w     int8 per output channel (symmetric), held once in oneDNN's blocked layout
        x_m ~ s_m q_m         int8 per row, quantized on the fly (native/w8a8.cpp)
        y_mn = s_m s_w[n] (q_m . Q_w[n])   the dot product exact in int32 (AMX-INT8 / VNNI), then scaled

    ``hadamard`` > 0: the layer's inputs are first multiplied by orthonormal Hadamard blocks of that size,
    which the caller has multiplied into W (``loom.models.rotation``): outliers spread over a block, so
    one scale per row loses less (QuaRot). The int8 weight exists only in the packed layout (``weight``
    unpacks a copy).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, hadamard: int = 0) -> None:
        super().__init__()
        if weight.device.type != "cpu" or not onednn_int8_available():
            raise ValueError("PackedW8A8Linear needs the CPU, oneDNN's int8 GEMM and loom's native kernels")
        self.out_features, self.in_features = weight.shape
        if hadamard and (hadamard & (hadamard - 1) or self.in_features % hadamard):
            raise ValueError(f"the Hadamard block {hadamard} must be a power of two dividing {self.in_features}")
        w = weight.detach().double()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-30)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.hadamard = hadamard
        # Plain attributes, not buffers: ``model.to(torch.bfloat16)`` must leave the fp32 scales as they are.
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.weight_scale = scale.float().contiguous()
        self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
        self.bias_fp32 = torch.empty(0) if bias is None else bias.detach().float().contiguous()

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias (fp32; added inside the kernel, with the row scales), or None."""
        return self.bias_fp32 if self.bias_fp32.numel() > 0 else None

    def spec(self) -> LinearSpec:
        return LinearSpec(LinearKind.ONEDNN_W8A8, [self.packed, self.weight_scale, self.zero_points, self.bias_fp32],
                          8, self.hadamard, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return apply_linear(x.reshape(-1, shape[-1]), self.spec()).view(*shape[:-1], -1)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weight dequantized, in the rotated basis the layer computes in (a copy)."""
        return self.packed.to_dense().t().float() * self.weight_scale[:, None]

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features + self.out_features * 4

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w8a8 oneDNN-packed"
                + (f", hadamard={self.hadamard}" if self.hadamard else ""))


def pack_w8a8_linears(model: nn.Module, hadamard: dict[str, int] | None = None) -> int:
    """Replace every dense ``Linear`` inside the decoder layers of a CPU model by its ``PackedW8A8Linear``
    (quantized from the layer's weight as it is, so quantize before any cast to bf16); ``hadamard`` gives
    the input Hadamard block of layers by name. The output layer stays as it is. Returns how many."""
    hadamard = hadamard or {}
    names = [name for name, m in model.named_modules() if type(m) is Linear and name.startswith("layers.")]
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        model.get_submodule(parent).__setattr__(child, PackedW8A8Linear(layer.weight, layer.bias, hadamard.get(name, 0)))
    return len(names)


def packed_dense_spec(weight: torch.Tensor, rows: int) -> LinearSpec:
    """A dense fp32 weight together with MKL's pre-packed copy of it for products of ``rows`` rows.

    Why: ``F.linear`` on a CPU hands x W^T to MKL's sgemm, which packs W into its blocked layout on
    every call: for a decode batch of 64 that repacking (reading and writing every weight once more)
    costs as much as the product itself. Packed once, the product of 64 rows runs 1.3-1.6x faster
    (SmolLM2's shapes, weights streamed from memory). The packed copy costs the weight's size again.
    MKL's packed product takes exactly ``rows`` rows; fewer (down to half) are padded with zeros.
    """
    return LinearSpec(LinearKind.DENSE_PACKED, [weight, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)],
                      0, 0, rows)


def linear_spec(layer: nn.Module) -> LinearSpec:
    """The ``LinearSpec`` of any linear layer (dense ones included)."""
    if type(layer) is Linear:
        return LinearSpec(LinearKind.DENSE, [layer.weight], 0, 0, 0)
    return layer.spec()  # type: ignore[operator]
