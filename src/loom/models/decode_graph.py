"""A scripted batch-1 decode step: the whole forward of one token as one TorchScript program.

Why: at batch 1 the weights stream from memory once per token (~30 ms for SmolLM2 in fp32 on
this CPU), and everything else is a few hundred tiny ops (norms, RoPE, cache writes, attention
over a short context). In Python each of those costs microseconds of interpreter and dispatch
time, and after every weight-streaming GEMV the interpreter's own data is cold in cache, which
makes it worse: eager decode spent ~16 ms per token outside matmuls. TorchScript runs the same
ops from its C++ interpreter; decode then spends ~7 ms outside matmuls. It is the CPU analogue of
replaying a CUDA graph for the decode step (vLLM, gpt-fast).

The program computes exactly what ``Transformer.forward`` computes for a Llama-shaped model
(pre-norm RMSNorm, SwiGLU, rotate-half RoPE, GQA, optional q/k/v bias and sliding window) on one
sequence whose cache is one contiguous block; tests hold the two to the same logits. Other
configurations, batches and prefills use the module path.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, List

import torch
import torch.nn.functional as F

from loom.layers.linear import Linear
from loom.models.transformer import Transformer


def _decode_step(token: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor, embed: torch.Tensor,
                 attn_norm: List[torch.Tensor], qkv_w: List[torch.Tensor], qkv_b: List[torch.Tensor],
                 o_w: List[torch.Tensor], mlp_norm: List[torch.Tensor], gate_up_w: List[torch.Tensor],
                 down_w: List[torch.Tensor], k_cache: List[torch.Tensor], v_cache: List[torch.Tensor],
                 final_norm: torch.Tensor, head: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
                 intermediate: int, eps: float, scale: float, windows: List[int]) -> torch.Tensor:
    """Logits [1, vocab] for ``token`` at position ``pos``; writes its K/V at slot ``pos`` of each layer."""
    hidden = embed.shape[1]
    half = head_dim // 2
    h = F.embedding(token, embed)
    for i in range(len(attn_norm)):
        x = torch.rms_norm(h, [hidden], attn_norm[i], eps)
        qkv = F.linear(x, qkv_w[i])
        if qkv_b[i].numel() > 0:
            qkv = qkv + qkv_b[i]
        qkv = qkv.view(1, n_heads + 2 * n_kv, head_dim)
        qk = qkv[:, : n_heads + n_kv]
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # RoPE: x cos + rotate_half(x) sin
        k_cache[i][:, pos] = qk[0, n_heads:]
        v_cache[i][:, pos] = qkv[0, n_heads + n_kv:]
        start = 0 if windows[i] == 0 else max(0, pos + 1 - windows[i])
        q = qk[:, :n_heads].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k_cache[i][:, start:pos + 1].unsqueeze(0),
                                           v_cache[i][:, start:pos + 1].unsqueeze(0), scale=scale,
                                           enable_gqa=n_heads != n_kv)
        h = h + F.linear(o[0].transpose(0, 1).reshape(1, n_heads * head_dim), o_w[i])
        x = torch.rms_norm(h, [hidden], mlp_norm[i], eps)
        gu = F.linear(x, gate_up_w[i])
        h = h + F.linear(F.silu(gu[:, :intermediate]) * gu[:, intermediate:], down_w[i])
    return F.linear(torch.rms_norm(h, [hidden], final_norm, eps), head)


@functools.lru_cache(maxsize=1)
def compiled_decode_step() -> Callable[..., torch.Tensor]:
    """``_decode_step`` compiled by TorchScript, or the plain function if TorchScript is unavailable.

    torch 2.13 marks ``torch.jit.script`` deprecated in favour of ``torch.compile``; we measured
    torch.compile on this step and it was slower (49 ms vs 37 ms per token on SmolLM2) after a
    10 s compile. Should a later torch drop TorchScript, the same code runs eagerly.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_decode_step)
    except Exception:  # noqa: BLE001 - any scripting failure means: run the Python function
        return _decode_step


class DecodeGraph:
    """Batch-1 decode over a contiguous cache [layers, 1, kv_heads, capacity, head_dim]."""

    def __init__(self, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        if not self.supports(model):
            raise ValueError("DecodeGraph needs a Llama-shaped fp32 model with dense weights (see DecodeGraph.supports)")
        c = model.config
        self.model = model
        layers = list(model.layers)
        empty = torch.empty(0, dtype=model.dtype)
        self.weights = (
            [l.attn_norm.weight for l in layers],
            [l.attn.qkv_proj.weight for l in layers],
            [l.attn.qkv_proj.bias if l.attn.qkv_proj.bias is not None else empty for l in layers],
            [l.attn.o_proj.weight for l in layers],
            [l.mlp_norm.weight for l in layers],
            [l.mlp.gate_up_proj.weight for l in layers],
            [l.mlp.down_proj.weight for l in layers],
        )
        self.k = [k_cache[i, 0] for i in range(c.num_layers)]
        self.v = [v_cache[i, 0] for i in range(c.num_layers)]
        self.shape = (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, float(c.norm_eps),
                      layers[0].attn.scale, [l.attn.window or 0 for l in layers])

    @staticmethod
    def supports(model: Transformer) -> bool:
        c = model.config
        return (c.norm == "rmsnorm" and c.norm_placement == "pre" and c.final_norm and not c.norm_bias
                and c.gated_mlp and c.activation == "silu" and not c.mlp_bias and not c.attn_out_bias
                and c.position == "rope" and c.rotary_dim == c.head_dim
                and model.dtype == torch.float32
                and all(type(m) is Linear for l in model.layers
                        for m in (l.attn.qkv_proj, l.attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj)))

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        m = self.model
        cos, sin = m.rotary.prepare(torch.tensor([pos]), m.dtype)
        return compiled_decode_step()(torch.tensor([token]), pos, cos, sin, m.embed_tokens.weight, *self.weights,
                            self.k, self.v, m.norm.weight, m.output_weight, *self.shape)
