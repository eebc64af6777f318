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

DeepSeek's routers (DeepSeek-V2 2405.04434, DeepSeek-V3 2412.19437; ``ModelConfig.moe_scoring`` and the
fields after it) extend ``route``:

    s = softmax(W_r x) (V2) or sigmoid(W_r x) (V3)     the scores, in fp32
    c = s + b                                           what the choice ranks: V3 adds a learned bias b
                                                        (e_score_correction_bias), V2 none (c = s)
    group-limited: the E experts form G groups; a group's score is its best c (V2's group_limited_greedy)
    or the sum of its best two (V3's noaux_tc); only the best ``topk_groups`` groups' experts may be chosen
    T = top_k(c); g_i = s_i (i in T), renormalized when ``normalize``, times ``routed_scale``

and their shared experts are added ungated (``shared_gated=False``): y = sum_{i in T} g_i E_i(x) + E_shared(x).

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


def route(logits: torch.Tensor, top_k: int, normalize: bool, scoring: str = "softmax",
          score_bias: torch.Tensor | None = None, groups: int = 1, topk_groups: int = 1,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k] int64) from router logits [T, E]: softmax in fp32 (fp64 for fp64
    logits), the top k (largest first, ties as ``torch.topk`` breaks them), renormalized to sum to 1 when
    ``normalize``. DeepSeek's options (the module docstring): ``scoring`` "sigmoid", a ``score_bias`` [E] that
    only the choice sees, group-limited choice (``groups`` > 1), the weights times ``scale``."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = torch.softmax(scores, dim=-1) if scoring == "softmax" else torch.sigmoid(scores)
    if score_bias is None and groups == 1:
        weights, experts = torch.topk(scores, top_k, dim=-1)
    else:
        choice = scores if score_bias is None else scores + score_bias.to(scores.dtype)
        if groups > 1:
            grouped = choice.view(choice.shape[0], groups, -1)
            group_scores = grouped.amax(dim=-1) if scoring == "softmax" else grouped.topk(2, dim=-1).values.sum(-1)
            kept = torch.zeros_like(group_scores, dtype=torch.bool)
            kept.scatter_(1, torch.topk(group_scores, topk_groups, dim=-1).indices, True)
            choice = choice.masked_fill(~kept.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        experts = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(1, experts)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights if scale == 1.0 else weights * scale, experts


class MoE(nn.Module):
    """A sparse mixture of SwiGLU experts with a top-k softmax router (and an optional gated shared expert).

    Parameters: ``router.weight`` [E, hidden]; ``experts.{e}.gate_up_proj.weight`` [2 f, hidden] and
    ``experts.{e}.down_proj.weight`` [hidden, f]; with a shared expert ``shared_expert.*`` (the same
    shapes with its own f) and ``shared_expert_gate.weight`` [1, hidden]. Buffer ``expert_tokens`` [E]
    (int64): tokens routed to each expert since the model was built (or ``reset_counts``).
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, normalize: bool = True,
                 shared_intermediate: int = 0, activation: str = "silu", dtype: torch.dtype = torch.float32,
                 scoring: str = "softmax", score_bias: bool = False, groups: int = 1, topk_groups: int = 1,
                 routed_scale: float = 1.0, shared_gated: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.scoring, self.groups, self.topk_groups, self.routed_scale = scoring, groups, topk_groups, routed_scale
        self.router = Linear(hidden, num_experts, dtype=dtype)
        # DeepSeek-V3's e_score_correction_bias: added to the scores that choose the experts (kept in fp32)
        self.score_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False) if score_bias else None
        self.experts = nn.ModuleList(GatedMLP(hidden, intermediate, activation, dtype=dtype)
                                     for _ in range(num_experts))
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if shared_intermediate:
            self.shared_expert = GatedMLP(hidden, shared_intermediate, activation, dtype=dtype)
            if shared_gated:
                self.shared_expert_gate = Linear(hidden, 1, dtype=dtype)
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> MoE:
        c = config
        return cls(c.hidden_size, c.moe_intermediate_size, c.num_experts,  # type: ignore[arg-type]
                   c.num_experts_per_tok, c.norm_topk_prob, c.shared_expert_intermediate_size, c.activation, dtype,
                   c.moe_scoring, c.moe_score_bias, c.moe_groups, c.moe_topk_groups, c.moe_routed_scale,
                   c.shared_expert_gated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        weights, experts = route(self.router(x), self.top_k, self.normalize, self.scoring, self.score_bias,
                                 self.groups, self.topk_groups, self.routed_scale)
        y = self.dispatch(x, weights, experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
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
