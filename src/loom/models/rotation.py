"""Rotating a decoder's hidden states so that int8 activations lose less (QuaRot, Ashkboos et al. 2024).

A pre-norm decoder is *computationally invariant* under an orthogonal Q of its residual stream: with each
RMSNorm's weight folded into the linears that read it, RMSNorm(h Q) = RMSNorm(h) Q (Q keeps norms), so

    readers (q|k|v, gate|up):  W <- W diag(gamma) Q        writers (o, down):  W <- Q^T W,  b <- b Q

compute the same function on h' = h Q. The stream is rotated once after the embedding (``residual_rotation``,
applied by the model) and rotated back before the final norm, whose weight stays where it is, so a tied
output layer keeps sharing the embedding table (one copy). Two more rotations are local:

    values:     each KV head's V <- V H (H: Hadamard of the head size), each query head's slice of o's
                input <- H: (P V H) H^T = P V, so o reads P V H, whose outliers are spread
    down_proj:  its input x -> x B with B orthonormal Hadamard blocks, computed on the fly by the int8
                quantizer (native/w8a8.cpp); W_down <- W_down B

In exact arithmetic nothing changes (the tests check the logits); what changes is the distribution of the
linears' inputs: RMSNorm outputs of LLMs carry a few channels far larger than the rest, and one int8 scale
per token spends its range on them. Spread over all channels by Q they cost little: on SmolLM2-135M per-token
int8 activations and per-channel int8 weights cost +3.2% perplexity plain and +0.47% rotated (fp32
simulation), +0.11% in the engine with bf16 elsewhere (docs/RESULTS.md).

Q = diag(signs) (R kron H_2^k) / sqrt(2^k), 2^k the largest power of two dividing the hidden size and R a
random orthogonal matrix of the odd part (9 x 9 for SmolLM2's 576); a Hadamard factor spreads better than a
dense random rotation (QuaRot's finding, and ours: +0.47% against +0.83%).
"""

from __future__ import annotations

import math

import torch

from loom.models.transformer import Transformer


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), entries +-1 (unnormalized)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def power_of_two_part(n: int, cap: int | None = None) -> int:
    """The largest power of two dividing n (at most ``cap``)."""
    p = n & -n
    while cap is not None and p > cap:
        p //= 2
    return p


def residual_rotation(hidden: int, seed: int = 0) -> torch.Tensor:
    """Q [hidden, hidden], orthogonal, in float64 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    p = power_of_two_part(hidden)
    odd = hidden // p
    r, upper = torch.linalg.qr(torch.randn(odd, odd, generator=g, dtype=torch.float64))
    r = r * torch.sign(torch.diagonal(upper))  # a unique, Haar-distributed factor
    signs = torch.randint(0, 2, (hidden,), generator=g).double() * 2 - 1
    return signs[:, None] * torch.kron(r.contiguous(), hadamard(p) / math.sqrt(p))


def rotation_problem(model: Transformer) -> str | None:
    """Why ``rotate`` cannot take this model, or None."""
    c = model.config
    if not (c.norm == "rmsnorm" and c.norm_placement == "pre" and not c.norm_bias and c.final_norm):
        return "it needs pre-norm RMSNorm without a bias and a final norm (the norms must commute with Q)"
    if not c.gated_mlp:
        return "it needs a gated MLP (gate|up, down)"
    if c.num_experts:
        return "it does not rotate mixture-of-experts layers (router, experts) yet"
    if c.is_mla:
        return "it does not rotate latent attention (layers/mla.py) yet"
    return None


@torch.no_grad()
def rotate(model: Transformer, seed: int = 0) -> dict[str, int]:
    """Rotate ``model`` in place (module docstring); returns, by linear name, the Hadamard block its input
    must be multiplied by on the fly (down_proj's), for ``pack_w8a8_linears``."""
    problem = rotation_problem(model)
    if problem is not None:
        raise ValueError(f"cannot rotate this model: {problem}")
    c = model.config
    q = residual_rotation(c.hidden_size, seed)
    d = c.head_dim
    head_h = hadamard(d) / math.sqrt(d) if d & (d - 1) == 0 else None
    block = power_of_two_part(c.intermediate_size, cap=512)
    down_b = torch.block_diag(*[hadamard(block) / math.sqrt(block)] * (c.intermediate_size // block))
    online: dict[str, int] = {}
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        for lin, norm in ((attn.qkv_proj, layer.attn_norm), (mlp.gate_up_proj, layer.mlp_norm)):
            w = lin.weight.double() * norm.weight.double()
            _set(lin.weight, w @ q)
            norm.weight.fill_(1.0)
        wo = attn.o_proj.weight.double()
        if head_h is not None:
            qkv = attn.qkv_proj.weight.double()
            v0 = c.q_size + c.kv_size
            for h in range(c.num_kv_heads):
                rows = slice(v0 + h * d, v0 + (h + 1) * d)
                qkv[rows] = head_h.t() @ qkv[rows]
                if attn.qkv_proj.bias is not None:
                    bias = attn.qkv_proj.bias
                    _set_slice(bias, rows, bias[rows].double() @ head_h)
            _set(attn.qkv_proj.weight, qkv)
            for h in range(c.num_heads):
                cols = slice(h * d, (h + 1) * d)
                wo[:, cols] = wo[:, cols] @ head_h
        _set(attn.o_proj.weight, q.t() @ wo)
        if attn.o_proj.bias is not None:
            _set(attn.o_proj.bias, attn.o_proj.bias.double() @ q)
        _set(mlp.down_proj.weight, q.t() @ (mlp.down_proj.weight.double() @ down_b))
        if mlp.down_proj.bias is not None:
            _set(mlp.down_proj.bias, mlp.down_proj.bias.double() @ q)
        online[f"layers.{i}.mlp.down_proj"] = block
    model.residual_rotation = q.to(model.dtype)
    return online


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _set_slice(param: torch.Tensor, rows: slice, value: torch.Tensor) -> None:
    param[rows] = value.to(param.dtype)
