"""Mixture-of-experts feed-forward layers: a router picks k of E SwiGLU experts per token.

A sparsely-gated MoE layer (Shazeer et al. 2017, arXiv 1701.06538) replaces the MLP by E experts
E_1..E_E and a router W_r [E, hidden]. For a token x:

    p = softmax(W_r x)                          router probabilities over the E experts (in fp32)
    T = top_k(p)                                the k experts with the largest p_i
    g_i = p_i / sum_{j in T} p_j   (i in T)     renormalized (Mixtral, 2401.04088: softmax over the
                                                top-k logits, which is the same thing), or g_i = p_i
                                                without renormalizing (Qwen2-MoE and OLMoE unless
                                                their config sets norm_topk_prob)
    y = sum_{i in T} g_i E_i(x)                 E_i(x) = down_i(silu(gate_i x) * up_i x)  (SwiGLU)

Qwen2-MoE adds a shared expert that every token runs, scaled by a sigmoid gate w_s [1, hidden]:

    y = sum_{i in T} g_i E_i(x) + sigmoid(w_s . x) E_shared(x)

Dispatch (``MoE.dispatch``): the T x k (token, expert) pairs are sorted by expert (a stable argsort);
the tokens are gathered in that order, so each expert's tokens are one contiguous run; each expert
with tokens runs once on its run (one gate|up and one down matmul, whatever the number of tokens);
the outputs, scaled by their g_i, are added back to their tokens' rows (``index_add_``). Only the
experts that received tokens run: a decode step of one token runs k experts, a long prefill all E.
The number of tokens each expert received is counted into the ``expert_tokens`` buffer (the engine's
stats report it per layer).

Each expert is a ``GatedMLP`` of loom ``Linear`` s (``experts.{e}.gate_up_proj`` holds gate and up as
one fused matrix, ``experts.{e}.down_proj``), so weight-only quantization can replace them like any
other linear.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers.linear import Linear
from loom.layers.mlp import GatedMLP


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k] int64) from router logits [T, E]: softmax in fp32 (fp64 for fp64
    logits), the top k (largest first, ties as ``torch.topk`` breaks them), renormalized to sum to 1 when
    ``normalize``."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class MoE(nn.Module):
    """A sparse mixture of SwiGLU experts with a top-k softmax router (and an optional gated shared expert).

    Parameters: ``router.weight`` [E, hidden]; ``experts.{e}.gate_up_proj.weight`` [2 f, hidden] and
    ``experts.{e}.down_proj.weight`` [hidden, f]; with a shared expert ``shared_expert.*`` (the same
    shapes with its own f) and ``shared_expert_gate.weight`` [1, hidden]. Buffer ``expert_tokens`` [E]
    (int64): tokens routed to each expert since the model was built (or ``reset_counts``).
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, normalize: bool = True,
                 shared_intermediate: int = 0, activation: str = "silu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.router = Linear(hidden, num_experts, dtype=dtype)
        self.experts = nn.ModuleList(GatedMLP(hidden, intermediate, activation, dtype=dtype)
                                     for _ in range(num_experts))
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if shared_intermediate:
            self.shared_expert = GatedMLP(hidden, shared_intermediate, activation, dtype=dtype)
            self.shared_expert_gate = Linear(hidden, 1, dtype=dtype)
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> MoE:
        return cls(config.hidden_size, config.moe_intermediate_size, config.num_experts,  # type: ignore[arg-type]
                   config.num_experts_per_tok, config.norm_topk_prob, config.shared_expert_intermediate_size,
                   config.activation, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        weights, experts = route(self.router(x), self.top_k, self.normalize)
        y = self.dispatch(x, weights, experts)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # type: ignore[misc]
        return y

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for every token t, grouping tokens by expert."""
        counts, order, rows = self.plan(experts)
        xs = x.index_select(0, rows)  # the tokens of each pair, grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, end in enumerate(counts.cumsum(0).tolist()):
            if end > start:
                ys[start:end] = self.experts[e](xs[start:end])
            start = end
        ys = ys * weights.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, rows, ys)

    def plan(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens per expert [E], the pairs sorted by expert [T k], each sorted pair's token [T k]) for
        experts [T, k]; counts the tokens into ``expert_tokens``."""
        flat = experts.reshape(-1)
        counts = torch.bincount(flat, minlength=self.num_experts)
        self.expert_tokens += counts
        order = torch.argsort(flat, stable=True)
        return counts, order, torch.div(order, self.top_k, rounding_mode="floor")

    def reset_counts(self) -> None:
        self.expert_tokens.zero_()


def make_moe(config: ModelConfig, dtype: torch.dtype = torch.float32) -> MoE:
    return MoE.from_config(config, dtype)


def moe_row_splits(prefix: str, moe: MoE) -> dict[str, list[int]]:
    """Row sizes of the fused gate|up parameters of ``moe`` (a module at ``prefix``), by parameter name."""
    splits: dict[str, list[int]] = {}
    mlps = [(f"experts.{e}", m) for e, m in enumerate(moe.experts)]
    if moe.shared_expert is not None:
        mlps.append(("shared_expert", moe.shared_expert))
    for name, mlp in mlps:
        splits[f"{prefix}.{name}.gate_up_proj.weight"] = [mlp.intermediate] * 2
    return splits


def expert_linears(moe: MoE) -> list[tuple[str, nn.Module]]:
    """(name under the MoE module, linear) of every expert's gate|up and down, the shared expert's included: what
    weight-only quantization replaces (the router and the shared expert's gate stay as they are)."""
    mlps = [(f"experts.{e}", m) for e, m in enumerate(moe.experts)]
    if moe.shared_expert is not None:
        mlps.append(("shared_expert", moe.shared_expert))
    return [(f"{name}.{proj}", getattr(m, proj)) for name, m in mlps for proj in ("gate_up_proj", "down_proj")]


def expert_token_counts(model: nn.Module) -> dict[int, list[int]]:
    """Tokens routed to each expert, per MoE layer (layer index -> counts), of a Transformer."""
    return {i: layer.mlp.expert_tokens.tolist() for i, layer in enumerate(model.layers)  # type: ignore[union-attr]
            if isinstance(layer.mlp, MoE)}
