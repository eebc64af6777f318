"""Streamed decoder layers refilled in place: a slot is a decoder layer built once, whose tensors each pass
overwrites with the next layer's bytes (seed 002: the per-pass work should be a copy, not a build).

Building a layer (weights/streaming.py ``LayerBuilder``) unpacks GGUF blocks into codes, packs them again into
loom's containers and allocates every module; refilling a slot writes the file's bytes straight into the
tensors the kernels read, because loom's containers are GGUF's own layouts:

    Q8_0  int8 container (code - 128 as int8)  = the block's signed qs             (a strided copy)
    Q4_0 / Q4_1  int4 container (byte i = q_i | q_{i+16} << 4) = the block's qs    (a strided copy)
    Q5_0 / Q5_1  int5 container (nibbles, then the 32 fifth bits) = qs, then qh    (two strided copies)
    Q4_K  int4 container: sub-block 2c's codes are the low nibbles of 32 bytes, 2c + 1's the high ones,
          re-paired as q_i | q_{i+16} << 4 (four byte-wise operations)
    Q6_K  int8 container: q6 - 32 from the low nibbles and the 2-bit highs (as weights/native.py decodes)

Scales and offsets are written with the same fp32 arithmetic as weights/native.py (d, -8 d, -16 d, -128 d, m;
d sc and -dmin m for Q4_K), and ``QuantizedLinear.refresh_kernel`` derives the kernel's fp16 copies as a fresh
layer would, so a refilled slot computes bit for bit what the layer ``load_model`` builds computes. Parts held
in a wider container than their own (a fused q|k|v of Q5_0 q, k and a Q8_0 v is int8) and containers a shape
forces (inputs not a multiple of 32) go through the portable form (``gguf_quantized``, ``widened``,
``QuantizedLinear.load_``): still in place, with more arithmetic. Dense parameters are copied into place.

A slot takes layer i only when layer i has the slot's structure (module types, which rotary table); per-layer
settings of its modules (the attention's layer index and window, which rotary table) are set from a skeleton
of layer i. A linear whose format differs from the slot's (Q4_K_M files mix Q4_K and Q6_K layers) is allocated
anew in the slot (``QuantizedLinear.allocate``) and filled the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from gguf.constants import GGMLQuantizationType as Q
from torch import nn

from loom.layers import fused
from loom.layers.linear import PackedLinear
from loom.layers.quantized import QuantizedLinear
from loom.models.transformer import DecoderLayer
from loom.weights.dequant import _k4_scale_min
from loom.weights.gguf import GGUF_ARCHITECTURES, TensorInfo, read_gguf_tensor, unpermute_rope
from loom.weights.loader import place_native_linears, source_tensor
from loom.weights.native import NATIVE_TYPES, gguf_quantized

_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q6_K: 8}
_GROUP = {Q.Q6_K: 16}  # 32 for the others
_BLOCK = {Q.Q4_0: (32, 18), Q.Q4_1: (32, 20), Q.Q5_0: (32, 22), Q.Q5_1: (32, 24), Q.Q8_0: (32, 34),
          Q.Q4_K: (256, 144), Q.Q6_K: (256, 210)}  # weights and bytes per block
_PLAIN = (int, float, bool, str, type(None))


def layer_structure(layer: nn.Module, shared: set[int]) -> tuple[Any, ...]:
    """What a slot must share with a layer to take its weights: its own modules' names and types (the model's
    ``shared`` modules it holds, the rotary tables, are settings)."""
    skip = [name for name, m in layer.named_modules() if id(m) in shared]
    return tuple((name, type(m).__name__) for name, m in layer.named_modules()
                 if not any(name == s or name.startswith(s + ".") for s in skip))


Settings = dict[str, tuple[type, dict[str, Any]]]


def layer_settings(layer: nn.Module, shared: set[int]) -> Settings:
    """The per-layer settings of a layer's modules: plain attributes (an attention's ``layer`` index, its
    ``window``) and which of the model's ``shared`` modules each holds (Gemma 3's local or global rotary
    table); module name -> (its type, {attribute: value})."""
    out: Settings = {}
    for name, m in layer.named_modules():
        if id(m) in shared:
            continue
        plain = {attr: value for attr, value in vars(m).items()
                 if not attr.startswith("_") and (isinstance(value, _PLAIN) or isinstance(value, tuple)
                                                  and all(isinstance(v, _PLAIN) for v in value))}
        plain.update({child: sub for child, sub in m._modules.items() if id(sub) in shared})
        out[name] = (type(m), plain)
    return out


def refillable(layer: nn.Module) -> bool:
    """Whether a built layer can be refilled in place: no weight held in an opaque (oneDNN-packed) layout."""
    return not any(isinstance(m, PackedLinear) for m in layer.modules())


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> fp32 [...]."""
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def _write_blocks(m: QuantizedLinear, info: TensorInfo, raw: torch.Tensor, row: int, heads: int = 0) -> bool:
    """Write one GGUF part (rows ``row``.. of ``m``) straight from its blocks, when its format maps onto the
    module's container as stored (module doc); False when it does not (the caller takes the portable form).
    ``heads`` > 0: the part's rows are llama.cpp's permuted Q or K rows of that many heads (un-permuted here)."""
    qtype = info.qtype
    if qtype in _WIDENABLE and m.bits == 8 and m.container_bits == 8 and m.group_size == 32:
        if heads:
            raw = unpermute_rope(raw.view(info.shape[0], -1), heads).reshape(-1)
        return _write_widened(m, info, raw, row)
    if qtype not in _BITS or _BITS[qtype] != m.bits or _GROUP.get(qtype, 32) != m.group_size:
        return False
    natural = {4: 4, 5: 5, 8: 8}[_BITS[qtype]]
    if m.container_bits != natural:
        return False
    n, k = info.shape
    per, nbytes = _BLOCK[qtype]
    nb = k // per
    b = raw.view(n, nb, nbytes)
    q, scales, offsets = m.qweight[row:row + n], m.scales[row:row + n], m.offsets[row:row + n]
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0) and fused.native_ops():
        torch.ops.loom.gguf_fill(raw, int(qtype), heads, q, scales, offsets)  # one pass (native/gguf_fill.cpp)
        return True
    if heads:  # the PyTorch path below reads rows in order: un-permute them first
        b = unpermute_rope(b.reshape(n, -1), heads).view(n, nb, nbytes)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        d = _f16(b[..., 0:2])
        scales.copy_(d)
        if qtype == Q.Q8_0:
            q.view(n, nb, 32).copy_(b[..., 2:34])
            torch.mul(d, -128.0, out=offsets)
        elif qtype in (Q.Q4_0, Q.Q4_1):
            start = 2 if qtype == Q.Q4_0 else 4
            q.view(n, nb, 16).copy_(b[..., start:start + 16])
            if qtype == Q.Q4_0:
                torch.mul(d, -8.0, out=offsets)
            else:
                offsets.copy_(_f16(b[..., 2:4]))
        else:
            start = 2 if qtype == Q.Q5_0 else 4  # Q5_1: d, m, qh, qs
            out = q.view(n, nb, 20)
            out[..., :16].copy_(b[..., start + 4:start + 20])
            out[..., 16:].copy_(b[..., start:start + 4])
            if qtype == Q.Q5_0:
                torch.mul(d, -16.0, out=offsets)
            else:
                offsets.copy_(_f16(b[..., 2:4]))
        return True
    flat = b.reshape(n * nb, nbytes)
    if qtype == Q.Q4_K:
        d, dmin = _f16(flat[:, 0:2]).unsqueeze(-1), _f16(flat[:, 2:4]).unsqueeze(-1)
        sc, mn = _k4_scale_min(flat[:, 4:16])
        scales.copy_((d * sc.float()).view(n, nb * 8))
        offsets.copy_((-(dmin * mn.float())).view(n, nb * 8))
        qs = b[..., 16:144].unflatten(-1, (4, 2, 16))  # chunk c: bytes 0-15 (lo) and 16-31 (hi)
        lo, hi = qs[..., 0, :], qs[..., 1, :]
        out = q.view(n, nb, 4, 2, 16)  # groups 2c (low nibbles) and 2c + 1 (high nibbles), 16 bytes each
        torch.bitwise_or(lo & 0x0F, hi << 4, out=out[..., 0, :])
        torch.bitwise_or(lo >> 4, hi & 0xF0, out=out[..., 1, :])
        return True
    # Q6_K, as weights/native.py decodes it; the int8 container holds (q + 96) - 128 = q - 32, i.e. q + 224 mod 256
    mb = n * nb
    ql, qh = flat[:, :128].reshape(mb, 2, 2, 32), flat[:, 128:192].reshape(mb, 2, 1, 32)
    sub = flat[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(flat[:, 208:210]).unsqueeze(-1)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    torch.add(low | (high << 4), 224, out=q.view(mb, 2, 4, 32))
    s = (d * sub).reshape(n, k // 16)
    scales.copy_(s)
    torch.mul(s, -128.0, out=offsets)
    return True


_WIDENABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def _write_widened(m: QuantizedLinear, info: TensorInfo, raw: torch.Tensor, row: int) -> bool:
    """A 4- or 5-bit part of a linear held as int8 (its parts mixed bits): ``QuantizedTensor.widened`` from the
    blocks, the container holding q + c - 128 = q - 2^(bits-1) and the offsets o - c d, c = 128 - 2^(bits-1)."""
    qtype = info.qtype
    n, k = info.shape
    per, nbytes = _BLOCK[qtype]
    nb = k // per
    b = raw.view(n, nb, nbytes)
    q, scales, offsets = m.qweight[row:row + n].view(n, nb, 32), m.scales[row:row + n], m.offsets[row:row + n]
    five = qtype in (Q.Q5_0, Q.Q5_1)
    start = 2 if qtype in (Q.Q4_0, Q.Q5_0) else 4  # after d (and m)
    qs = b[..., start + 4 * five:start + 4 * five + 16]
    torch.bitwise_and(qs, 0x0F, out=q[..., :16])
    torch.bitwise_right_shift(qs, 4, out=q[..., 16:])
    if five:
        bits = (b[..., start:start + 4].unsqueeze(-1) >> _SHIFTS) & 1  # bit j of the little-endian qh: element j
        q |= bits.view(n, nb, 32) << 4
    q += 256 - (16 if five else 8)  # q - 2^(bits-1), modulo 256: the int8 container's bytes
    d = _f16(b[..., 0:2])
    scales.copy_(d)
    base = -16.0 * d if qtype == Q.Q5_0 else -8.0 * d if qtype == Q.Q4_0 else _f16(b[..., 2:4])
    torch.sub(base, (128 - (16 if five else 8)) * d, out=offsets)
    return True


_SHIFTS = torch.arange(8, dtype=torch.uint8)


class SlotFiller:
    """Refills a slot (a decoder layer built by ``builder``) with layer ``i``'s bytes (module doc)."""

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.modules_built = 0  # linears built anew because their format differed from the slot's

    def fill(self, slot: DecoderLayer, i: int, data: dict[str, torch.Tensor], settings: Settings) -> None:
        """Overwrite ``slot``'s tensors with layer ``i``'s (``data``: its source tensors' bytes, which may be
        views of the read buffer: nothing of them is kept) and set layer ``i``'s settings."""
        from loom.weights.streaming import _BufferedCheckpoint, _BufferedGGUF

        b = self.builder
        src, config = b.sources, b.config
        for name, (kind, plain) in settings.items():
            module = slot.get_submodule(name) if name else slot
            if type(module) is not kind:  # a native linear in the skeleton's Linear's place: its own settings
                continue
            for attr, value in plain.items():
                if getattr(module, attr, None) is not value and getattr(module, attr, None) != value:
                    setattr(module, attr, value)
        sources = dict(b._by_layer[i])
        filled: set[str] = set()
        if src.format == "gguf":
            g = _BufferedGGUF(src.path, src.gguf_tensors, data)  # type: ignore[arg-type]
            fetch = lambda n: read_gguf_tensor(g, config, n)  # noqa: E731
            if src.native:
                filled |= place_native_linears(
                    sources, lambda target, parts, bias: self._fill_linear(slot, target, g, parts, bias))
        else:
            ckpt = _BufferedCheckpoint(src.locations, data)
            from loom.weights.hf import read_hf_tensor

            fetch = lambda n: read_hf_tensor(config, ckpt, n)  # type: ignore[arg-type]  # noqa: E731
        params = dict(slot.named_parameters())
        for name, names in sources.items():
            if name in filled:
                continue
            param = params[name]
            param.copy_(source_tensor(tuple(param.shape), names, src.row_splits.get(f"layers.{i}.{name}"), fetch,
                                      src.path, src.dtype))

    def _fill_linear(self, slot: DecoderLayer, target: str, g: Any, parts: list[str],
                     bias_parts: list[str] | None) -> bool:
        """Fill the native linear ``target`` of ``slot`` from GGUF ``parts``; False when the parts have no native
        form (the parameter is then filled densely, as the loader fills it)."""
        config = self.builder.config
        infos = [g.info(p) for p in parts]
        if any(p.endswith("]") for p in parts) or any(t.qtype not in NATIVE_TYPES or len(t.shape) != 2 for t in infos) \
                or len({_GROUP.get(t.qtype, 32) for t in infos}) != 1:
            return False
        bits = max(8 if len({_BITS[t.qtype] for t in infos}) > 1 else 0, *(_BITS[t.qtype] for t in infos))
        rows = sum(t.shape[0] for t in infos)
        m = slot.get_submodule(target)
        fits = (isinstance(m, QuantizedLinear) and m.bits == bits and m.group_size == _GROUP.get(infos[0].qtype, 32)
                and (m.out_features, m.in_features) == (rows, infos[0].shape[1])
                and (m.bias is None) == (bias_parts is None))
        if not fits:  # a format the slot does not hold (Q4_K_M mixes them): a linear of it, allocated, to fill
            m = QuantizedLinear.allocate(rows, infos[0].shape[1], bits, _GROUP.get(infos[0].qtype, 32),
                                         bias_parts is not None)
            parent, _, child = target.rpartition(".")
            setattr(slot.get_submodule(parent) if parent else slot, child, m)
            self.modules_built += 1
        permuted = GGUF_ARCHITECTURES[config.architecture]["permuted"]
        row = 0
        for name, info in zip(parts, infos):
            heads = (config.num_heads if name.endswith("attn_q.weight") else
                     config.num_kv_heads if name.endswith("attn_k.weight") else 0) if permuted else 0
            raw = g.raw(name)  # llama.cpp's interleaved Q/K rows: un-permuted as whole rows of blocks (the scales
            # travel with them), by the writer or here for the portable form
            if not _write_blocks(m, info, raw.reshape(-1), row, heads):
                if heads:
                    raw = unpermute_rope(raw.view(info.shape[0], -1), heads)
                qt = gguf_quantized(g, config, name)
                assert qt is not None
                if qt.bits < m.bits:
                    qt = qt.widened(m.bits)
                m.load_(qt, row)
            row += info.shape[0]
        m.refresh_kernel()
        if bias_parts is not None:
            m.bias.copy_(torch.cat([read_gguf_tensor(g, config, p) for p in bias_parts]))  # type: ignore[union-attr]
        return True
