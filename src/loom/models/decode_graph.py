"""A scripted decode step: the whole forward of one new token per sequence as one TorchScript program.

Why: at batch 1 the weights stream from memory once per token (~30 ms for SmolLM2 in fp32 on
this CPU), and everything else is a few hundred tiny ops (norms, RoPE, cache writes, attention
over a short context). In Python each of those costs microseconds of interpreter and dispatch
time, and after every weight-streaming GEMV the interpreter's own data is cold in cache, which
makes it worse: eager decode spent ~16 ms per token outside matmuls. TorchScript runs the same
ops from its C++ interpreter; decode then spends ~7 ms outside matmuls. It is the CPU analogue of
replaying a CUDA graph for the decode step (vLLM, gpt-fast).

The program computes exactly what ``Transformer.forward`` computes for a Llama-shaped model
(pre-norm RMSNorm, SwiGLU, rotate-half RoPE, GQA, optional q/k/v bias and sliding window) for a
batch of decoding sequences over a paged (or contiguous) cache; tests hold the two to the same
logits. Other configurations, and steps that prefill, use the module path.

Faster still, for small batches: the same step in C++ (native/decode_step.cpp, ``native_decoder``),
one OpenMP parallel region per step instead of one interpreter visit, allocation and thread start
per op. At batch 1 on SmolLM2 it takes 10.4 ms per token where the scripted step takes 13.8 (4-bit
native weights) and 29 ms where it takes 36 (fp32). It takes models whose linears are loom's int4 /
int8 kind or dense fp32; the scripted step remains the readable reference and the general path.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from loom.layers import fused, kernels
from loom.layers.linear import Linear
from loom.layers.quantized import (DENSE, DENSE_PACKED, LOOM, QuantizedLinear, W8A8Linear, apply_linear,
                                   dense_kernel_args, packed_dense_args)
from loom.models.transformer import Transformer

if TYPE_CHECKING:
    from loom.engine.kv_cache import KVCache
    from loom.models.cuda_graph import CudaGraphDecode


LinearSpec = Tuple[int, List[torch.Tensor], int, int]  # (kind, tensors, bits, group): see quantized.apply_linear


def _decode_step(tokens: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, embed: torch.Tensor,
                 attn_norm: List[torch.Tensor], qkv: List[LinearSpec], qkv_b: List[torch.Tensor],
                 o: List[LinearSpec], mlp_norm: List[torch.Tensor], gate_up: List[LinearSpec],
                 down: List[LinearSpec], k_cache: List[torch.Tensor], v_cache: List[torch.Tensor],
                 final_norm: torch.Tensor, head: LinearSpec, n_heads: int, n_kv: int, head_dim: int,
                 eps: float, scale: float, windows: List[int]) -> torch.Tensor:
    """Logits [B, vocab] for one new token per sequence; writes each token's K/V at its slot."""
    b = tokens.shape[0]
    h = F.embedding(tokens, embed)
    for i in range(len(attn_norm)):
        x = rms_norm(h, attn_norm[i], eps)
        qkv_i = apply_linear(x, qkv[i][0], qkv[i][1], qkv[i][2], qkv[i][3])
        if qkv_b[i].numel() > 0:
            qkv_i = qkv_i + qkv_b[i]
        qkv_i = qkv_i.view(b, n_heads + 2 * n_kv, head_dim)
        qk = qkv_i[:, : n_heads + n_kv]
        qk = rope(qk, cos, sin)  # x cos + rotate_half(x) sin
        k_cache[i].view(-1, n_kv, head_dim).index_copy_(0, slots, qk[:, n_heads:])
        v_cache[i].view(-1, n_kv, head_dim).index_copy_(0, slots, qkv_i[:, n_heads + n_kv:])
        a = attention(qk[:, :n_heads], k_cache[i], v_cache[i], block_tables, context_lens, scale, windows[i])
        h = h + apply_linear(a.reshape(b, n_heads * head_dim), o[i][0], o[i][1], o[i][2], o[i][3])
        x = rms_norm(h, mlp_norm[i], eps)
        gu = apply_linear(x, gate_up[i][0], gate_up[i][1], gate_up[i][2], gate_up[i][3])
        h = h + apply_linear(silu_and_mul(gu), down[i][0], down[i][1], down[i][2], down[i][3])
    return apply_linear(rms_norm(h, final_norm, eps), head[0], head[1], head[2], head[3])


# The decode step's kernels, bound when the step is compiled: the native ones if they build.
attention = kernels.paged_decode_attention_torch
rms_norm = fused.rms_norm_torch
silu_and_mul = fused.silu_and_mul_torch
rope = fused.rope_torch


def _native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.loom.rms_norm(x, weight, eps)


def _native_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.loom.silu_and_mul(gate_up)


def _native_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.ops.loom.rope(x, cos, sin)


@functools.lru_cache(maxsize=1)
def compiled_decode_step() -> Callable[..., torch.Tensor]:
    """``_decode_step`` compiled by TorchScript, or the plain function if TorchScript is unavailable.

    torch 2.13 marks ``torch.jit.script`` deprecated in favour of ``torch.compile``; we measured
    torch.compile on this step and it was slower (49 ms vs 37 ms per token on SmolLM2) after a
    10 s compile. Should a later torch drop TorchScript, the same code runs eagerly.
    """
    global attention, rms_norm, silu_and_mul, rope
    if fused.native_ops():
        attention = kernels.paged_decode_attention_native
        rms_norm, silu_and_mul, rope = _native_rms_norm, _native_silu_and_mul, _native_rope
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_decode_step)
    except Exception:  # noqa: BLE001 - any scripting failure means: run the Python function
        return _decode_step


# The largest batch the native step takes (measured on SmolLM2, 2 cores: the native step is 1.2-1.6x
# faster than the scripted one up to 32 sequences with loom-quantized weights, and with dense fp32
# weights only at batch 1, where MKL's GEMM wins as soon as there are rows to block over). Larger
# batches take the scripted step, whose linears hand many-row products to BLAS (apply_linear).
NATIVE_MAX_BATCH_QUANTIZED = 32
NATIVE_MAX_BATCH_DENSE = 1
# Below this many rows the transposed product (layers/linear.py) is as fast as a packed one.
MIN_PACK_ROWS = 32
# Where the linears' specs sit in DecodeGraph.weights (q|k|v, o, gate|up, down; the others are norms
# and biases).
LINEARS = (1, 3, 5, 6)


def native_decoder(model: Transformer, weights: tuple, head: LinearSpec, k: List[torch.Tensor], v: List[torch.Tensor],
                   shape: tuple) -> Optional[torch.ScriptObject]:
    """The decode step as one native call (native/decode_step.cpp), for models whose linears are all
    loom's int4 / int8 kind or dense fp32 on the CPU; None otherwise (or without the native build)."""
    specs = [*(spec for i in LINEARS for spec in weights[i]), head]
    if not fused.native_ops() or any(kind not in (DENSE, LOOM) for kind, *_ in specs):
        return None
    n_heads, n_kv, head_dim, eps, scale, windows = shape
    empty = torch.empty(0)

    def add(fn: Callable[..., None], spec: LinearSpec) -> None:
        kind, t, bits, group = spec
        fn(t[0], *(t[1:3] if kind == LOOM else (empty, empty)), bits, group)

    dec = torch.classes.loom.NativeDecoder(model.embed_tokens.weight, model.norm.weight, n_heads, n_kv, head_dim, eps,
                                           scale)
    add(dec.set_head, head)
    attn_norm, qkv, qkv_b, o, mlp_norm, gate_up, down = weights
    for i in range(len(attn_norm)):
        dec.add_layer(attn_norm[i], mlp_norm[i], qkv_b[i], k[i], v[i], windows[i])
        for spec in (qkv[i], o[i], gate_up[i], down[i]):
            add(dec.add_linear, spec)
    return dec


class DecodeGraph:
    """Decode steps (one new token for each of B sequences) over a KV cache [layers, blocks, block_size,
    kv_heads, head_dim], paged or contiguous (one block per sequence): the native step for small
    batches where it takes the model, the scripted step otherwise."""

    def __init__(self, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, native: bool = True,
                 pack_rows: int = 0) -> None:
        """``native``: run small batches through the native step (decode_step.cpp) where it takes the
        model; otherwise every batch runs the scripted step. ``pack_rows``: pre-pack the dense fp32
        weights for the scripted step's batches of that many sequences (``packed_dense_args``; 0: no)."""
        if not self.supports(model):
            raise ValueError("DecodeGraph needs a Llama-shaped fp32 model with dense or weight-only quantized linears "
                             "(see DecodeGraph.supports)")
        c = model.config
        self.model = model
        layers = list(model.layers)
        empty = torch.empty(0, dtype=model.dtype)
        self.weights = (
            [l.attn_norm.weight for l in layers],
            [dense_kernel_args(l.attn.qkv_proj) for l in layers],
            [l.attn.qkv_proj.bias if l.attn.qkv_proj.bias is not None else empty for l in layers],
            [dense_kernel_args(l.attn.o_proj) for l in layers],
            [l.mlp_norm.weight for l in layers],
            [dense_kernel_args(l.mlp.gate_up_proj) for l in layers],
            [dense_kernel_args(l.mlp.down_proj) for l in layers],
        )
        self.head = dense_kernel_args(model.lm_head) if model.lm_head is not None else \
            (0, [model.embed_tokens.weight], 0, 0)
        self.k = [k_cache[i] for i in range(c.num_layers)]
        self.v = [v_cache[i] for i in range(c.num_layers)]
        self.shape = (c.num_heads, c.num_kv_heads, c.head_dim, float(c.norm_eps),
                      layers[0].attn.scale, [l.attn.window or 0 for l in layers])
        self.native = native_decoder(model, self.weights, self.head, self.k, self.v, self.shape) if native else None
        dense = any(kind == DENSE for i in LINEARS for kind, *_ in self.weights[i])
        self.native_max_batch = NATIVE_MAX_BATCH_DENSE if dense else NATIVE_MAX_BATCH_QUANTIZED
        # After native_decoder, which takes the plain weights.
        rows = pack_rows if pack_rows >= MIN_PACK_ROWS and torch.backends.mkl.is_available() else 0
        self.packed_bytes = self._pack_dense_weights(rows) if rows else 0
        self.packed_rows = rows if self.packed_bytes else 0  # 0: nothing dense to pack (quantized models)
        self.use_native = True  # benchmarks switch it off to time the scripted step

    def _pack_dense_weights(self, rows: int) -> int:
        """Swap every dense linear spec (and a dense head) for its MKL-packed form; returns the packed
        copies' bytes (the weights' size again: MKL's buffers report a padded shape)."""
        def pack(spec: LinearSpec) -> LinearSpec:
            return packed_dense_args(spec[1][0], rows) if spec[0] == DENSE else spec

        w = list(self.weights)
        for i in LINEARS:
            w[i] = [pack(spec) for spec in w[i]]
        self.weights, self.head = tuple(w), pack(self.head)
        specs = [*(spec for i in LINEARS for spec in w[i]), self.head]
        return sum(t[0].numel() * t[0].element_size() for kind, t, *_ in specs if kind == DENSE_PACKED)

    @staticmethod
    def supports(model: Transformer) -> bool:
        c = model.config
        return (c.norm == "rmsnorm" and c.norm_placement == "pre" and c.final_norm and not c.norm_bias
                and c.gated_mlp and c.activation == "silu" and not c.mlp_bias and not c.attn_out_bias
                and c.position == "rope" and c.rotary_dim == c.head_dim
                and model.dtype == torch.float32 and model.device.type == "cpu"
                and all(type(m) in (Linear, QuantizedLinear, W8A8Linear) for l in model.layers
                        for m in (l.attn.qkv_proj, l.attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj))
                and (model.lm_head is None or type(model.lm_head) in (Linear, QuantizedLinear, W8A8Linear)))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots, context_lens: [B]; block_tables [B, max_blocks]. Returns logits [B, V]."""
        m = self.model
        cos, sin = m.rotary.prepare(positions, m.dtype)
        if self.native is not None and self.use_native and tokens.shape[0] <= self.native_max_batch:
            return self.native.step(tokens, slots, block_tables, context_lens, cos, sin)
        return compiled_decode_step()(tokens, slots, block_tables, context_lens, cos, sin, m.embed_tokens.weight,
                                      *self.weights, self.k, self.v, m.norm.weight, self.head, *self.shape)

    def step_one(self, token: int, pos: int, block_table: torch.Tensor) -> torch.Tensor:
        """One sequence whose cache is the single block ``block_table[0, 0]`` (the contiguous case)."""
        block = int(block_table[0, 0])
        capacity = self.k[0].shape[1]
        return self(torch.tensor([token]), torch.tensor([pos]), torch.tensor([block * capacity + pos]),
                    block_table, torch.tensor([pos + 1]))


def make_decode_graph(model: Transformer, kv_cache: KVCache, pack_rows: int = 0
                      ) -> Union[DecodeGraph, CudaGraphDecode, None]:
    """The decode-step accelerator for the model's device: the scripted step on the CPU, CUDA graphs on a
    GPU; None where neither takes the model (other shapes, an int8 KV cache): the module path runs.
    ``pack_rows``: the decode batch the CPU step pre-packs dense weights for (the engine's max_num_seqs;
    LOOM_PACK_WEIGHTS=0 switches packing off)."""
    if kv_cache.quantized:
        return None
    if model.device.type == "cuda":
        from loom.models.cuda_graph import CudaGraphDecode

        return CudaGraphDecode(model, kv_cache.k, kv_cache.v) if CudaGraphDecode.supports(model) else None
    if os.environ.get("LOOM_PACK_WEIGHTS", "1") == "0":
        pack_rows = 0
    return DecodeGraph(model, kv_cache.k, kv_cache.v, pack_rows=pack_rows) if DecodeGraph.supports(model) else None
