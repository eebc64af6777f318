"""A slot refilled in place from GGUF blocks holds exactly the linear the loader builds (weights/slots.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from loom.layers.quantized import QuantizedLinear
from loom.weights.gguf import TensorInfo
from loom.weights.loader import native_linear
from loom.weights.slots import _BLOCK, SlotFiller
from loom.weights.streaming import _BufferedGGUF

# where each block format keeps its fp16 fields (d, m / dmin): random bytes elsewhere are valid codes
F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}


def _blocks(qtype: Q, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    per, nbytes = _BLOCK[qtype]
    b = torch.randint(0, 256, (n * k // per, nbytes), dtype=torch.uint8, generator=gen)
    for at in F16_FIELDS[qtype]:
        d = (torch.rand(b.shape[0], generator=gen) * 0.02 + 1e-3) * (torch.randint(0, 2, (b.shape[0],), generator=gen) * 2 - 1)
        b[:, at:at + 2] = d.half().view(torch.uint8).view(-1, 2)
    return b.reshape(-1)


def _gguf(parts: dict[str, tuple[Q, int, int]], seed: int) -> _BufferedGGUF:
    gen = torch.Generator().manual_seed(seed)
    infos, data = {}, {}
    for name, (qtype, n, k) in parts.items():
        data[name] = _blocks(qtype, n, k, gen)
        infos[name] = TensorInfo(name, (n, k), qtype, 0, data[name].numel())
    return _BufferedGGUF("test.gguf", infos, data)


LLAMA = SimpleNamespace(architecture="llama", num_heads=4, num_kv_heads=2)  # q / k rows stored permuted
GEMMA = SimpleNamespace(architecture="gemma3", num_heads=4, num_kv_heads=2)

CASES = [  # (config, parts): one linear's GGUF parts, fused row-wise
    *[(GEMMA, {"blk.0.ffn_down.weight": (qtype, 64, 256)}) for qtype in F16_FIELDS],
    (LLAMA, {"blk.0.attn_q.weight": (Q.Q4_0, 64, 256), "blk.0.attn_k.weight": (Q.Q4_0, 32, 256),
             "blk.0.attn_v.weight": (Q.Q4_0, 32, 256)}),
    (LLAMA, {"blk.0.attn_q.weight": (Q.Q4_K, 64, 256), "blk.0.attn_k.weight": (Q.Q4_K, 32, 256),
             "blk.0.attn_v.weight": (Q.Q4_K, 32, 256)}),
    # Gemma 3 Q4_K_M's q|k|v: Q5_0 q and k with a Q8_0 v, held widened as int8
    (GEMMA, {"blk.0.attn_q.weight": (Q.Q5_0, 64, 256), "blk.0.attn_k.weight": (Q.Q5_0, 32, 256),
             "blk.0.attn_v.weight": (Q.Q8_0, 32, 256)}),
    (GEMMA, {"blk.0.ffn_gate.weight": (Q.Q5_1, 64, 256), "blk.0.ffn_up.weight": (Q.Q5_1, 64, 256)}),
    (LLAMA, {"blk.0.attn_q.weight": (Q.Q4_1, 64, 256), "blk.0.attn_k.weight": (Q.Q5_1, 32, 256),
             "blk.0.attn_v.weight": (Q.Q4_0, 32, 256)}),
]


@pytest.mark.parametrize("config, parts", CASES, ids=lambda c: "-".join(f"{q.name}" for q, *_ in c.values())
                         if isinstance(c, dict) else c.architecture)
def test_a_refilled_linear_equals_the_one_the_loader_builds(config, parts):
    names = list(parts)
    fresh_src, slot_src = _gguf(parts, seed=1), _gguf(parts, seed=2)
    want = native_linear(fresh_src, config, names)
    slot = native_linear(slot_src, config, names)
    assert isinstance(want, QuantizedLinear) and isinstance(slot, QuantizedLinear)
    kernel_before = [t.data_ptr() for t in slot.kernel_tensors]
    filler = SlotFiller(SimpleNamespace(config=config))
    holder = torch.nn.Module()
    holder.proj = slot
    assert filler._fill_linear(holder, "proj", fresh_src, names, None)
    assert holder.proj is slot and filler.modules_built == 0  # filled in place, not built anew
    assert torch.equal(slot.qweight, want.qweight)
    assert torch.equal(slot.scales, want.scales) and torch.equal(slot.offsets, want.offsets)
    assert len(slot.kernel_tensors) == len(want.kernel_tensors)
    for got, ref in zip(slot.kernel_tensors, want.kernel_tensors):
        assert got.dtype == ref.dtype and torch.equal(got, ref)
    # the tensors the kernel reads were written into, not replaced (a compiled step's pointers stay valid)
    assert [t.data_ptr() for t in slot.kernel_tensors][:2] == kernel_before[:2]
    x = torch.randn(40, slot.in_features, generator=torch.Generator().manual_seed(0))
    for rows in (1, 40):  # the decode kernel and the tiled one
        assert torch.equal(slot(x[:rows]), want(x[:rows]))
    ref = x[:1].double() @ want.dequantized_weight().double().T  # and the weight is the file's (fp32 decode kernel)
    assert (want(x[:1]).double() - ref).abs().max() < 1e-5 * ref.abs().max() * 10


def test_a_part_of_another_format_is_built_anew():
    """Q4_K_M files mix formats across layers: a slot holding a Q6_K down projection takes a Q4_K one by
    building that linear anew."""
    q6 = _gguf({"blk.0.ffn_down.weight": (Q.Q6_K, 64, 256)}, seed=1)
    q4 = _gguf({"blk.0.ffn_down.weight": (Q.Q4_K, 64, 256)}, seed=2)
    holder = torch.nn.Module()
    holder.proj = native_linear(q6, GEMMA, ["blk.0.ffn_down.weight"])
    filler = SlotFiller(SimpleNamespace(config=GEMMA))
    assert filler._fill_linear(holder, "proj", q4, ["blk.0.ffn_down.weight"], None)
    assert filler.modules_built == 1 and holder.proj.bits == 4 and holder.proj.kernel_tensors[0] is holder.proj.qweight
    want = native_linear(q4, GEMMA, ["blk.0.ffn_down.weight"])
    x = torch.randn(3, 256)
    assert torch.equal(holder.proj(x), want(x))


def test_blocks_are_random_but_valid():
    assert np.isfinite(_gguf({"w": (Q.Q8_0, 4, 64)}, 0).raw("w")[:2].view(torch.float16).float().numpy()).all()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
@pytest.mark.parametrize("heads", [0, 4])
def test_the_native_block_writer_equals_the_pytorch_one(monkeypatch, qtype, heads):
    """native/gguf_fill.cpp de-interleaves the legacy blocks (and un-permutes llama.cpp's Q/K rows) in one pass:
    the container bytes, scales and offsets equal the PyTorch writer's exactly."""
    from loom.layers import fused
    from loom.weights.slots import _write_blocks

    assert fused.native_ops()  # the project's machines build them (tests/native/test_native.py)
    n, k = 64, 256
    raw = _blocks(qtype, n, k, torch.Generator().manual_seed(int(qtype)))
    info = TensorInfo("blk.0.attn_q.weight", (n, k), qtype, 0, raw.numel())
    bits = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8}[qtype]
    native, torch_path = (QuantizedLinear.allocate(n, k, bits, 32) for _ in range(2))
    assert _write_blocks(native, info, raw, 0, heads)
    monkeypatch.setattr(fused, "native_ops", lambda: False)
    assert _write_blocks(torch_path, info, raw, 0, heads)
    for name in ("qweight", "scales", "offsets"):
        assert torch.equal(getattr(native, name), getattr(torch_path, name)), name
