"""Mixture-of-experts layers (layers/moe.py) against a naive per-token reference in float64, and the MoE
fields of ModelConfig (validation, parameter counts, which layers are MoE)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.config import ModelConfig
from loom.layers import fused
from loom.layers.mlp import GatedMLP
from loom.layers.moe import MoE, expert_token_counts, route
from loom.models.transformer import Transformer


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """The PyTorch twins of the elementwise kernels: the native silu_and_mul computes fp64 in fp32."""
    monkeypatch.setattr(fused, "native_ops", lambda: False)


def random_moe(hidden=16, inter=24, experts=6, top_k=2, normalize=True, shared=0, seed=0,
               dtype=torch.float64) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(hidden, inter, experts, top_k, normalize, shared, dtype=dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The equations of the module docstring, one token at a time."""
    out = []
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ moe.router.weight.T, dim=-1)
        top = sorted(range(moe.num_experts), key=lambda i: -p[i].item())[:moe.top_k]
        g = p[top] / p[top].sum() if moe.normalize else p[top]
        y = sum(g[j] * expert(moe.experts[i], x[t]) for j, i in enumerate(top))
        if moe.shared_expert is not None:
            y = y + torch.sigmoid(x[t] @ moe.shared_expert_gate.weight[0]) * expert(moe.shared_expert, x[t])
        out.append(y)
    return torch.stack(out)


def expert(mlp: GatedMLP, x: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_up_proj.weight.split(mlp.intermediate)
    return mlp.down_proj.weight @ (F.silu(gate @ x) * (up @ x))


@pytest.mark.parametrize("top_k,normalize,shared", [(2, True, 0), (2, False, 0), (1, True, 0), (3, False, 20),
                                                    (6, True, 0)], ids=["top2-renorm", "top2", "top1", "top3-shared",
                                                                        "all-experts"])
def test_dispatch_equals_the_per_token_reference(top_k, normalize, shared):
    moe = random_moe(top_k=top_k, normalize=normalize, shared=shared)
    x = torch.randn(37, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-12, atol=1e-12)
    assert moe.expert_tokens.sum().item() == 37 * top_k


def test_experts_without_tokens_are_skipped_and_counted_as_zero():
    moe = random_moe(experts=8)
    with torch.no_grad():  # the router sees only the first coordinate: experts 2..7 never win
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 3.0, 2.0
    called = []
    for e, m in enumerate(moe.experts):
        m.register_forward_hook(lambda mod, inp, out, e=e: called.append((e, inp[0].shape[0])))
    x = torch.randn(5, 16, dtype=torch.float64)
    x[:, 0] = torch.linspace(1, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-12, atol=1e-12)
    assert called == [(0, 5), (1, 5)]  # one call per expert with tokens, all of its tokens at once
    assert moe.expert_tokens.tolist() == [5, 5, 0, 0, 0, 0, 0, 0]


def test_one_token_and_an_empty_batch():
    moe = random_moe()
    x = torch.randn(1, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-12, atol=1e-12)
    assert moe(torch.zeros(0, 16, dtype=torch.float64)).shape == (0, 16)


def test_a_token_gives_the_same_output_in_any_batch():
    moe = random_moe(dtype=torch.float32)
    x = torch.randn(20, 16)
    full = moe(x)
    for rows in ([3], [0, 19], list(range(7, 14))):
        torch.testing.assert_close(moe(x[rows]), full[rows], rtol=1e-5, atol=1e-6)


def test_route_softmaxes_then_takes_the_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, e = route(logits, 2, normalize=False)
    p = torch.softmax(logits, -1)[0]
    assert e.tolist() == [[1, 2]] and torch.allclose(w[0], p[[1, 2]])
    w, e = route(logits, 2, normalize=True)  # Mixtral: the same as a softmax over the two chosen logits
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([3.0, 2.0]), -1))
    assert route(logits.bfloat16(), 2, True)[0].dtype == torch.float32  # weights in fp32 (at least)


def test_bfloat16_is_close_to_float64():
    moe = random_moe(shared=8)
    x = torch.randn(9, 16, dtype=torch.float64)
    want = moe(x)
    got = moe.to(torch.bfloat16)(x.bfloat16()).double()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def config(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32, **moe)


def test_config_counts_total_and_active_parameters():
    dense = config()
    assert dense.num_parameters(active=True) == dense.num_parameters()
    moe = config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                 moe_layers=(True, False, True))
    model = Transformer(moe)
    assert sum(p.numel() for p in model.parameters()) == moe.num_parameters()
    h = 16
    inactive = 2 * 2 * 3 * h * 8  # two MoE layers, two experts each not run
    assert moe.num_parameters() - moe.num_parameters(active=True) == inactive
    assert [type(l.mlp).__name__ for l in model.layers] == ["MoE", "GatedMLP", "MoE"]
    olmoe = config(num_experts=4, num_experts_per_tok=1, qk_norm_full=True)
    assert sum(p.numel() for p in Transformer(olmoe).parameters()) == olmoe.num_parameters()
    assert olmoe.moe_intermediate_size == 32  # defaults to intermediate_size
    assert ModelConfig.from_dict(moe.to_dict()) == moe


@pytest.mark.parametrize("fields,match", [
    (dict(num_experts=4, num_experts_per_tok=5), "between 1 and num_experts"),
    (dict(num_experts=4, num_experts_per_tok=0), "between 1 and num_experts"),
    (dict(num_experts_per_tok=2), "need num_experts > 0"),
    (dict(shared_expert_intermediate_size=8), "need num_experts > 0"),
    (dict(num_experts=4, num_experts_per_tok=2, moe_layers=(True,)), "one entry per layer"),
    (dict(num_experts=4, num_experts_per_tok=2, mlp_bias=True), "gated MLPs without biases"),
    (dict(num_experts=-1), ">= 0"),
])
def test_bad_moe_configs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        config(**fields)


def test_model_counts_tokens_per_expert_and_layer():
    model = Transformer(config(num_experts=4, num_experts_per_tok=2, moe_layers=(False, True, True))).init_random(1)
    model.logits(torch.arange(10))
    counts = expert_token_counts(model)
    assert sorted(counts) == [1, 2] and all(sum(c) == 20 for c in counts.values())


# DeepSeek's routers -----------------------------------------------------------------------------------------

def deepseek_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's routing (V2: softmax, group score = best expert; V3: sigmoid, bias for the choice only, group
    score = best two), one token at a time, with the shared expert added ungated."""
    out = []
    e, groups = moe.num_experts, moe.groups
    size = e // groups
    for t in range(x.shape[0]):
        logits = x[t] @ moe.router.weight.T
        s = torch.softmax(logits, -1) if moe.scoring == "softmax" else torch.sigmoid(logits)
        c = s + (moe.score_bias if moe.score_bias is not None else 0)
        group_score = [sorted(c[g * size:(g + 1) * size].tolist(), reverse=True)[:1 if moe.scoring == "softmax" else 2]
                       for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -sum(group_score[g]))[:moe.topk_groups]
        allowed = [i for i in range(e) if i // size in kept]
        top = sorted(allowed, key=lambda i: -c[i].item())[:moe.top_k]
        g = s[top] / s[top].sum() if moe.normalize else s[top]
        g = g * moe.routed_scale
        y = sum(g[j] * expert(moe.experts[i], x[t]) for j, i in enumerate(top))
        out.append(y + expert(moe.shared_expert, x[t]))
    return torch.stack(out)


@pytest.mark.parametrize("scoring,bias,groups,topk_groups,normalize,scale", [
    ("softmax", False, 1, 1, False, 1.5),   # DeepSeek-V2 greedy
    ("softmax", False, 4, 2, False, 1.0),   # DeepSeek-V2 group_limited_greedy
    ("sigmoid", True, 4, 2, True, 2.5),     # DeepSeek-V3 noaux_tc
    ("sigmoid", True, 1, 1, False, 1.0),
], ids=["v2-greedy", "v2-groups", "v3", "v3-one-group"])
def test_deepseek_routing_equals_the_per_token_reference(scoring, bias, groups, topk_groups, normalize, scale):
    torch.manual_seed(0)
    moe = MoE(16, 12, 8, 3, normalize, 20, dtype=torch.float64, scoring=scoring, score_bias=bias, groups=groups,
              topk_groups=topk_groups, routed_scale=scale, shared_gated=False)
    assert moe.shared_expert_gate is None
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(41, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), deepseek_reference(moe, x), rtol=1e-12, atol=1e-12)
    assert (moe.expert_tokens > 0).sum() > 3  # routing depends on the token


def test_group_limited_routing_chooses_only_in_the_best_groups():
    # 4 groups of 2; the bias pushes experts 6 and 7 (group 3) to the top, expert 0 (group 0) next
    logits = torch.zeros(1, 8)
    bias = torch.tensor([0.3, 0.0, 0.1, 0.1, 0.0, 0.0, 1.0, 0.9])
    w, e = route(logits, 3, normalize=False, scoring="sigmoid", score_bias=bias, groups=4, topk_groups=2, scale=2.0)
    assert sorted(e[0].tolist()) == [0, 6, 7]  # groups 3 (1.9) and 0 (0.3): not 2 or 3 (0.2 each)
    torch.testing.assert_close(w, torch.full((1, 3), 0.5 * 2.0))  # sigmoid(0) times the scale: no bias in weights


def test_deepseek_config_fields():
    moe = config(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=8, shared_expert_intermediate_size=16,
                 shared_expert_gated=False, moe_scoring="sigmoid", moe_score_bias=True, moe_groups=4,
                 moe_topk_groups=2, moe_routed_scale=2.5)
    assert not moe.moe_plain_routing and config(num_experts=4, num_experts_per_tok=2).moe_plain_routing
    assert sum(p.numel() for p in Transformer(moe).parameters()) == moe.num_parameters()
    assert ModelConfig.from_dict(moe.to_dict()) == moe
    for fields, match in [(dict(moe_groups=3), "dividing num_experts"), (dict(moe_topk_groups=5), "moe_topk_groups"),
                          (dict(moe_groups=8, moe_scoring="sigmoid"), "best two"),
                          (dict(moe_groups=4, moe_topk_groups=1, num_experts_per_tok=3), "exceeds the experts"),
                          (dict(moe_routed_scale=0.0), "moe_routed_scale"), (dict(moe_scoring="relu"), "moe_scoring")]:
        with pytest.raises(ValueError, match=match):
            config(**(dict(num_experts=8, num_experts_per_tok=2) | fields))
    with pytest.raises(ValueError, match="describe a router"):
        config(moe_routed_scale=2.0)
