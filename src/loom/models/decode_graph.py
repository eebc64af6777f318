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
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Callable, List, Tuple, Union

import torch
import torch.nn.functional as F

from loom.layers import fused, kernels
from loom.layers.linear import Linear
from loom.layers.quantized import QuantizedLinear, W8A8Linear, apply_linear, dense_kernel_args
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


class DecodeGraph:
    """Decode steps (one new token for each of B sequences) over a KV cache [layers, blocks, block_size,
    kv_heads, head_dim], paged or contiguous (one block per sequence)."""

    def __init__(self, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
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
        return compiled_decode_step()(tokens, slots, block_tables, context_lens, cos, sin, m.embed_tokens.weight,
                                      *self.weights, self.k, self.v, m.norm.weight, self.head, *self.shape)

    def step_one(self, token: int, pos: int, block_table: torch.Tensor) -> torch.Tensor:
        """One sequence whose cache is the single block ``block_table[0, 0]`` (the contiguous case)."""
        block = int(block_table[0, 0])
        capacity = self.k[0].shape[1]
        return self(torch.tensor([token]), torch.tensor([pos]), torch.tensor([block * capacity + pos]),
                    block_table, torch.tensor([pos + 1]))


def make_decode_graph(model: Transformer, kv_cache: KVCache) -> Union[DecodeGraph, CudaGraphDecode, None]:
    """The decode-step accelerator for the model's device: the scripted step on the CPU, CUDA graphs on a
    GPU; None where neither takes the model (other shapes, an int8 KV cache): the module path runs."""
    if kv_cache.quantized:
        return None
    if model.device.type == "cuda":
        from loom.models.cuda_graph import CudaGraphDecode

        return CudaGraphDecode(model, kv_cache.k, kv_cache.v) if CudaGraphDecode.supports(model) else None
    return DecodeGraph(model, kv_cache.k, kv_cache.v) if DecodeGraph.supports(model) else None
