"""The scripted decode step: the whole forward of a decode batch as one TorchScript program.

Why: at batch 1 the weights stream from memory once per token (~30 ms for SmolLM2 in fp32 on this
CPU), and everything else is a few hundred tiny ops (norms, RoPE, cache writes, attention over a
short context). In Python each of those costs microseconds of interpreter and dispatch time, and
after every weight-streaming GEMV the interpreter's own data is cold in cache, which makes it worse:
eager decode spent ~16 ms per token outside matmuls. TorchScript runs the same ops from its C++
interpreter; decode then spends ~7 ms outside matmuls. It is the CPU analogue of replaying a CUDA
graph for the decode step (vLLM, gpt-fast).

The program computes exactly what ``Transformer.forward`` computes for a Llama-shaped model
(pre-norm RMSNorm, SwiGLU, rotate-half RoPE, GQA, optional q/k/v bias and sliding window), and for its
mixture-of-experts variants (Mixtral, Qwen2-MoE: ``DecodeProgram.experts`` routes and dispatches with the
same tensor ops as layers/moe.py, the loop over experts with rows inside TorchScript); tests hold the two
to the same logits. Its elementwise kernels are a submodule chosen when the program is built:
loom's native ops where they compiled, their PyTorch twins otherwise.

Dense fp32 weights can also be held MKL-packed for the engine's decode batch (``pack_rows``; the runner asks
for it only with LOOM_PACK_WEIGHTS=mkl, since it is a second copy): ``F.linear`` lets MKL repack every
weight on every call, which at 64 rows costs about a third of the product.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from loom.engine.step.base import DecodeBatch, DecodeStep
from loom.engine.step.weights import AttentionShape, DecoderWeights, LayerWeights, MoEWeights, tensor_parallel
from loom.layers import fused, kernels
from loom.layers.kv_quant import decode_attention_int8_torch, write_int8_torch
from loom.layers.linear_spec import LinearKind, LinearSpec
from loom.layers.multi_lora import LayerLora, LoraWeights, add_lora_torch
from loom.layers.parallel import QuantizedVocabHead, VocabParallelHead
from loom.layers.quantized import apply_linear
from loom.models.transformer import Transformer

log = logging.getLogger("loom.engine")

# Below this many rows the transposed product (layers/linear.py) is as fast as a packed one.
MIN_PACK_ROWS = 32


def all_reduce_sum(x: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of every tensor-parallel rank's ``x``: torch.distributed's functional all-reduce, which TorchScript
    compiles (not counted in layers/parallel.COLLECTIVES, which times the module path's collectives)."""
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group))


class TorchOps(nn.Module):
    """The step's elementwise kernels in PyTorch (the twins of the native ones)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return fused.rms_norm_torch(x, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return fused.silu_and_mul_torch(gate_up)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return fused.rope_torch(x, cos, sin)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        return kernels.paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, window)

    def write_int8(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor) -> None:
        write_int8_torch(k, v, slots, k_cache, v_cache, k_scale, v_scale, v_zero)

    def attention_int8(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                       v_scale: torch.Tensor, v_zero: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        return decode_attention_int8_torch(q, k_cache, v_cache, k_scale, v_scale, v_zero, block_tables, context_lens,
                                           scale, window)

    def lora(self, y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slots: torch.Tensor) -> torch.Tensor:
        return add_lora_torch(y, x, w, slots)

    def all_reduce(self, x: torch.Tensor, group: str) -> torch.Tensor:
        return all_reduce_sum(x, group)


class NativeOps(nn.Module):
    """The step's elementwise kernels from loom's native build (native/fused.cpp, paged_attention.cpp)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.ops.loom.rms_norm(x, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return torch.ops.loom.silu_and_mul(gate_up)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.ops.loom.rope(x, cos, sin)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        return torch.ops.loom.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window)

    def write_int8(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor) -> None:
        torch.ops.loom.int8_kv_write(k, v, slots, k_cache, v_cache, k_scale, v_scale, v_zero)

    def attention_int8(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                       v_scale: torch.Tensor, v_zero: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        return torch.ops.loom.paged_decode_attention_int8(q, k_cache, v_cache, k_scale, v_scale, v_zero, block_tables,
                                                          context_lens, scale, window)

    def lora(self, y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slots: torch.Tensor) -> torch.Tensor:
        # lora_add_ takes x and y both fp32 or both bf16, with A and B both fp32 or both bf16 (multi_lora.add_lora).
        act = x.dtype == y.dtype and (y.dtype == torch.float32 or y.dtype == torch.bfloat16)
        pool = w.a.dtype == w.b.dtype and (w.a.dtype == torch.float32 or w.a.dtype == torch.bfloat16)
        if act and pool:
            return torch.ops.loom.lora_add_(y, x, w.a, w.b, slots, w.cols)
        return add_lora_torch(y, x, w, slots)

    def all_reduce(self, x: torch.Tensor, group: str) -> torch.Tensor:
        return all_reduce_sum(x, group)


class DecodeProgram(nn.Module):
    """Logits [B, vocab] for one new token per sequence; writes each token's K/V at its slot. With ``lora``
    (one LayerLora per layer) and ``lora_slots`` [B] non-empty, each row adds its adapter's product to
    every linear's output (layers/multi_lora.py). With ``kv_scales`` (per layer: the int8 cache's key scales,
    value scales and value zeros; layers/kv_quant.py) the caches are int8 and are written and read as such."""

    def __init__(self, ops: nn.Module) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                context_lens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, embed: torch.Tensor,
                layers: List[LayerWeights], final_norm: torch.Tensor, head: LinearSpec,
                k_cache: List[torch.Tensor], v_cache: List[torch.Tensor], shape: AttentionShape,
                rotation: torch.Tensor, lora: List[LayerLora], lora_slots: torch.Tensor,
                moe: List[MoEWeights], kv_scales: List[List[torch.Tensor]], tp_group: str) -> torch.Tensor:
        b = tokens.shape[0]
        adapted = lora_slots.numel() > 0 and len(lora) > 0
        # one row of slots per linear (q|k|v, o, gate|up, down), or one row for all four
        per_linear = lora_slots if lora_slots.dim() == 2 else lora_slots.expand(4, lora_slots.shape[0])
        hq, hkv, d, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.eps
        h = F.embedding(tokens, embed)
        rotated = rotation.numel() > 0
        if rotated:  # the residual stream in its rotated basis (models/rotation.py)
            h = torch.mm(h, rotation)
        for i, w in enumerate(layers):
            x = self.ops.rms_norm(h, w.attn_norm, eps)
            qkv = apply_linear(x, w.qkv)
            if adapted:
                qkv = self.ops.lora(qkv, x, lora[i].qkv, per_linear[0])
            if w.qkv_bias.numel() > 0:
                qkv = qkv + w.qkv_bias
            qkv = qkv.view(b, hq + 2 * hkv, d)
            qk = self.ops.rope(qkv[:, : hq + hkv], cos, sin)  # x cos + rotate_half(x) sin, q and k together
            if len(kv_scales) > 0:
                ks, vs, vz = kv_scales[i][0], kv_scales[i][1], kv_scales[i][2]
                self.ops.write_int8(qk[:, hq:], qkv[:, hq + hkv:], slots, k_cache[i], v_cache[i], ks, vs, vz)
                a = self.ops.attention_int8(qk[:, :hq], k_cache[i], v_cache[i], ks, vs, vz, block_tables,
                                            context_lens, shape.scale, shape.windows[i])
            else:
                k_cache[i].view(-1, hkv, d).index_copy_(0, slots, qk[:, hq:])
                v_cache[i].view(-1, hkv, d).index_copy_(0, slots, qkv[:, hq + hkv:])
                a = self.ops.attention(qk[:, :hq], k_cache[i], v_cache[i], block_tables, context_lens, shape.scale,
                                       shape.windows[i])
            a = a.reshape(b, hq * d)
            o = apply_linear(a, w.o)
            if adapted:
                o = self.ops.lora(o, a, lora[i].o, per_linear[1])
            if tp_group != "":  # o is row-parallel: this rank's heads' share of the sum
                o = self.ops.all_reduce(o, tp_group)
            h = h + o
            x = self.ops.rms_norm(h, w.mlp_norm, eps)
            if len(moe) > 0 and moe[i].top_k > 0:
                h = h + self.experts(x, moe[i])
                continue
            gate_up = apply_linear(x, w.gate_up)
            if adapted:
                gate_up = self.ops.lora(gate_up, x, lora[i].gate_up, per_linear[2])
            act = self.ops.silu_and_mul(gate_up)
            down = apply_linear(act, w.down)
            if adapted:
                down = self.ops.lora(down, act, lora[i].down, per_linear[3])
            if tp_group != "":
                down = self.ops.all_reduce(down, tp_group)
            h = h + down
        if rotated:
            h = torch.mm(h, rotation.t())
        x = self.ops.rms_norm(h, final_norm, eps)
        if head.kind == LinearKind.DENSE and x.dtype == torch.bfloat16 and b >= 8:
            # A plain bf16 output layer (the tied embedding, which the lookup needs unpacked) as W x^T: the
            # same products, 1.7x faster for 64 rows than x W^T (whose W oneDNN reorders on every call). The
            # logits come out column-major; the sampler's argmax reads them in place.
            return torch.mm(head.tensors[0], x.t()).t()
        return apply_linear(x, head)

    def experts(self, x: torch.Tensor, m: MoEWeights) -> torch.Tensor:
        """A mixture-of-experts MLP (layers/moe.py: MoE.forward, the same ops): route, sort the (row, expert)
        pairs by expert, one gate|up and down per expert with rows, scale and add back; the shared expert."""
        probs = torch.softmax(apply_linear(x, m.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, m.top_k, dim=-1)
        if m.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.reshape(-1)
        counts = torch.bincount(flat, minlength=len(m.gate_up))
        m.counts.add_(counts)
        order = torch.argsort(flat, stable=True)
        rows = torch.div(order, m.top_k, rounding_mode="floor")
        xs = x.index_select(0, rows)
        ys = torch.empty_like(xs)
        ends: List[int] = counts.cumsum(0).tolist()
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                ys[start:end] = apply_linear(self.ops.silu_and_mul(apply_linear(xs[start:end], m.gate_up[e])),
                                             m.down[e])
            start = end
        ys = ys * weights.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
        y = torch.zeros_like(x).index_add_(0, rows, ys)
        if len(m.shared) > 0:
            shared = apply_linear(self.ops.silu_and_mul(apply_linear(x, m.shared[0])), m.shared[1])
            y = y + torch.sigmoid(apply_linear(x, m.shared[2])) * shared
        return y


@functools.lru_cache(maxsize=4)
def decode_program(native: bool, script: bool = True) -> nn.Module:
    """The program with native or PyTorch kernels, compiled by TorchScript (``script``), once per process.

    torch 2.13 marks ``torch.jit.script`` deprecated in favour of ``torch.compile``; we measured
    torch.compile on this step and it was slower (49 ms vs 37 ms per token on SmolLM2) after a 10 s
    compile. Should a later torch drop TorchScript, the same module runs eagerly.
    """
    if native and not fused.native_ops():
        raise RuntimeError("loom's native kernels are not available (LOOM_NATIVE=0, or they did not build)")
    program = DecodeProgram(NativeOps() if native else TorchOps())
    if not script:
        return program
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(program)
    except Exception as e:  # noqa: BLE001 - any scripting failure means: run the Python module
        log.warning("TorchScript could not compile the decode step; it runs eagerly (slower): %s", e)
        return program


class ScriptedStep(DecodeStep):
    """Any decode batch of a Llama-shaped fp32 or bf16 CPU model, through the TorchScript program."""

    name = "scripted"

    def __init__(self, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, pack_rows: int = 0,
                 weights: DecoderWeights | None = None, script: bool = True, lora: list[LayerLora] | None = None,
                 kv_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 tp_group: str = "") -> None:
        """``k_cache``/``v_cache``: [layers, blocks, block_size, kv_heads, head_dim]. ``pack_rows``: hold dense
        weights MKL-packed for batches of that many rows (>= MIN_PACK_ROWS; 0: no packing;
        LOOM_PACK_WEIGHTS=0 switches it off). ``script=False`` runs the same program eagerly (tests).
        ``lora``: the adapter slots (engine/adapters.py) rows of a batch may name in ``lora_slots``. ``kv_scales``:
        for an int8 cache (engine/kv_cache.py), its key scales [layers, kv_heads, head_dim] and value scales and
        zeros [layers, blocks, block_size, kv_heads]. ``tp_group``: for one rank's shard of a tensor-parallel model
        (models/tensor_parallel.py), the torch.distributed group name its o and down projections all-reduce over
        (the vocabulary-parallel embedding and output layer gather in their own modules around the program)."""
        self.rotary = model.rotary
        self.dtype = model.dtype
        weights = weights or DecoderWeights.of(model)
        if os.environ.get("LOOM_PACK_WEIGHTS", "1") == "0" or not torch.backends.mkl.is_available():
            pack_rows = 0
        if pack_rows >= MIN_PACK_ROWS and weights.has_dense:
            weights = weights.packed(pack_rows)
        self.weights = weights
        self.packed_bytes = weights.packed_bytes
        self.packed_rows = pack_rows if self.packed_bytes else 0  # 0: nothing dense to pack (quantized models)
        self.k = list(k_cache.unbind(0))
        self.v = list(v_cache.unbind(0))
        if tensor_parallel(model) != bool(tp_group):
            raise ValueError("a tensor-parallel shard decodes through the scripted step with its group's name "
                             "(tp_group), and only a shard does")
        self.tp_group = tp_group
        head = model.lm_head
        self.gather = head.gather if isinstance(head, (VocabParallelHead, QuantizedVocabHead)) else None
        per_layer = zip(*(t.unbind(0) for t in kv_scales)) if kv_scales is not None else ()
        self.kv_scales = [list(scales) for scales in per_layer]
        self.program = decode_program(fused.native_ops(), script)
        self.lora = lora or []
        self._no_slots = torch.empty(0, dtype=torch.long)

    def supports(self, batch: DecodeBatch) -> bool:
        return batch.lora_slots is None or bool(self.lora)

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        w = self.weights
        cos, sin = self.rotary.prepare(batch.positions, self.dtype)
        slots = self._no_slots if batch.lora_slots is None else batch.lora_slots
        tokens, table = w.embedding_rows(batch.tokens)
        logits = self.program(tokens, batch.slots, batch.block_tables, batch.context_lens, cos, sin, table,
                            w.layers, w.final_norm, w.head, self.k, self.v, w.shape, w.rotation, self.lora, slots,
                            w.moe, self.kv_scales, self.tp_group)
        return logits if self.gather is None else self.gather(logits)

    def describe(self) -> str:
        kv = "; int8 KV cache" if self.kv_scales else ""
        return self._describe_weights() + kv

    def _describe_weights(self) -> str:
        if any(spec.kind == LinearKind.ONEDNN_W8A8 for spec in self.weights.linears()):
            return "scripted (int8: W8A8 linears oneDNN-packed, AMX-INT8 GEMMs, rotated residual stream; bf16 elsewhere)"
        if any(spec.kind == LinearKind.ONEDNN for spec in self.weights.linears()):
            return "scripted (bf16, linears oneDNN-packed: AMX GEMMs)"
        if self.packed_rows:
            return (f"scripted (dense weights also MKL-packed for decode batches of {self.packed_rows}: "
                    f"{self.packed_bytes / 2**20:.0f} MiB more; LOOM_PACK_WEIGHTS=0 turns it off)")
        return self.name
