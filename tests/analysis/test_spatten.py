"""SpAtten cascade pruning: importance against transformers' attention probabilities, the pruned forward
against a naive masked computation, and keep = 1 against the unpruned model."""

from __future__ import annotations

import math

import pytest
import torch

from loom.analysis.spatten import SpAttenConfig, pruned_forward, savings, schedule, tail_nll
from loom.config import ModelConfig
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=64, rope_theta=100.0)
IDS = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(3))
PROMPT = 32  # 31 prunable tokens, the last prompt token and 8 tail tokens stay


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG).init_random(seed=2, std=0.3)


def test_keep_one_is_the_unpruned_model(model):
    out = pruned_forward(model, IDS, PROMPT, SpAttenConfig(keep=1.0))
    want = model.logits(IDS)[PROMPT - 1:-1]
    torch.testing.assert_close(out.logits, want, atol=0, rtol=0)
    assert out.tokens_per_layer == [40] * 4 and out.heads_per_layer == [4] * 4


def test_schedule():
    assert schedule(30, (0.25, 0.5, 0.75), 0.125) == pytest.approx({8: 0.5, 15: 0.25, 22: 0.125})
    assert schedule(30, (0.25, 0.5, 0.75), 1.0) == {}


def test_importance_is_the_attention_received_in_transformers(tmp_path):
    """Before the first stage nothing is pruned: the scores are transformers' attention probabilities
    (eager attention, output_attentions) summed over heads, prompt queries and the layers so far."""
    from loom.weights.loader import load_model
    from tests.helpers import save_tiny_hf

    hf = save_tiny_hf(str(tmp_path), "llama", num_key_value_heads=2, num_hidden_layers=4, initializer_range=0.2,
                      attn_implementation="eager")
    loaded = load_model(str(tmp_path))
    ids = [int(t) for t in IDS]
    out = pruned_forward(loaded.model, IDS, PROMPT, SpAttenConfig(keep=0.25, stages=(0.5, 0.75)))  # layers 2, 3
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions  # per layer [1, H, T, T]
    want = sum(a[0, :, :PROMPT, :PROMPT].sum(dim=(0, 1)) for a in att[:2])[: PROMPT - 1]
    torch.testing.assert_close(out.token_scores[0].float(), want.float(), atol=1e-5, rtol=1e-5)
    assert len(out.token_scores) == 2 and out.tokens_per_layer == [40, 40, 25, 17]  # 31 -> 16 -> 8 (+ 9 kept)


def naive_pruned(model: Transformer, ids: torch.Tensor, prompt: int, token_plan: dict[int, float],
                 head_plan: dict[int, float], mean: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The same algorithm without removing anything: every token keeps its row, pruned tokens are masked
    out as keys (and their queries ignored), pruned heads' outputs zeroed; attention written out by hand."""
    c = model.config
    t = ids.numel()
    prunable = prompt - 1
    alive = torch.ones(t, dtype=torch.bool)
    heads = torch.ones(c.num_heads, dtype=torch.bool)
    score, head_score, snapshots = torch.zeros(t, dtype=torch.float64), torch.zeros(c.num_heads, dtype=torch.float64), []
    pos = torch.arange(t)
    h = model.embed(ids, pos)
    cos, sin = model.rotary.cos_sin(pos)
    causal = pos[None, :] <= pos[:, None]
    for i, block in enumerate(model.layers):
        if i in token_plan:
            cand = torch.nonzero(alive[:prunable]).flatten()
            n_keep = max(1, round(token_plan[i] * prunable))
            snapshots.append(score[cand].clone())
            drop = cand[torch.argsort(score[cand], descending=True)[n_keep:]]
            alive[drop] = False
        if i in head_plan:
            n_keep = max(1, round(head_plan[i] * c.num_heads))
            keep = torch.argsort(head_score.masked_fill(~heads, -math.inf), descending=True)[:n_keep]
            heads = torch.zeros_like(heads)
            heads[keep] = True
        x = block.attn_norm(h)
        qkv = x @ block.attn.qkv_proj.weight.T
        q = qkv[:, : c.q_size].view(t, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size: c.q_size + c.kv_size].view(t, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].view(t, c.num_kv_heads, c.head_dim)
        rot = lambda z: z * cos[:, None] + torch.cat([-z[..., c.head_dim // 2:], z[..., : c.head_dim // 2]], -1) * sin[:, None]  # noqa: E731
        q, k = rot(q), rot(k)
        group = c.num_heads // c.num_kv_heads
        o = torch.zeros(t, c.num_heads, c.head_dim)
        for hd in range(c.num_heads):
            s = (q[:, hd] @ k[:, hd // group].T) / math.sqrt(c.head_dim)
            p = torch.softmax(s.masked_fill(~(causal & alive[None, :]), -math.inf), dim=-1)
            o[:, hd] = p @ v[:, hd // group]
            rows = alive & (pos < prompt)
            seen_by = (rows[:, None] & causal).sum(0).clamp(min=1) if mean else 1  # queries that see each key
            score += p[rows].sum(0).double() / seen_by
        head_score += o[alive & (pos < prompt)].abs().sum(dim=(0, 2)).double()
        o = o * heads[None, :, None]
        h = h + o.reshape(t, -1) @ block.attn.o_proj.weight.T
        h = h + block.mlp(block.mlp_norm(h))
    return model.compute_logits(model.norm(h))[prompt - 1:-1], snapshots, torch.nonzero(alive[:prunable]).flatten()


@pytest.mark.parametrize("cfg", [
    SpAttenConfig(keep=0.25, stages=(0.25, 0.5, 0.75)),
    SpAttenConfig(keep=0.5, stages=(0.5,), head_keep=0.5, head_stages=(0.25, 0.75)),
    SpAttenConfig(keep=0.25, stages=(0.25, 0.5, 0.75), scorer="importance-mean"),
], ids=["tokens", "tokens+heads", "mean"])
def test_pruned_forward_equals_the_masked_computation(model, cfg):
    out = pruned_forward(model, IDS, PROMPT, cfg)
    token_plan = schedule(4, cfg.stages, cfg.keep)
    head_plan = schedule(4, cfg.head_stages, cfg.head_keep)
    with torch.inference_mode():
        logits, snapshots, kept = naive_pruned(model, IDS, PROMPT, token_plan, head_plan,
                                               mean=cfg.scorer == "importance-mean")
    assert out.kept_positions.tolist() == kept.tolist()
    assert len(out.token_scores) == len(snapshots) == len(token_plan)
    for got, want in zip(out.token_scores, snapshots):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    unpruned = model.logits(IDS)[PROMPT - 1:-1]
    assert (out.logits - unpruned).abs().max() > 1e-3  # pruning changed the tail's predictions
    if cfg.head_keep < 1:
        assert out.heads_per_layer == [4, 3, 3, 2]  # 4 -> round(4 x 0.5^(1/2)) = 3 -> 2


def test_baselines_keep_what_they_say(model):
    recent = pruned_forward(model, IDS, PROMPT, SpAttenConfig(keep=0.5, stages=(0.5,), scorer="recent", sinks=2))
    n_keep = round(0.5 * (PROMPT - 1))
    assert recent.kept_positions.tolist() == [0, 1] + list(range(PROMPT - 1 - (n_keep - 2), PROMPT - 1))
    rand = pruned_forward(model, IDS, PROMPT, SpAttenConfig(keep=0.5, stages=(0.5,), scorer="random"))
    assert rand.kept_positions.numel() == n_keep and rand.kept_positions.tolist() != recent.kept_positions.tolist()


def test_savings_and_tail_nll():
    s = savings([100, 100, 60, 60], [4, 4, 4, 2], full_tokens=100, tail=10, num_heads=4)
    assert s["kv_fraction"] == pytest.approx((90 + 90 + 50 + 50) / (4 * 90))
    assert s["prefill_linear_fraction"] == pytest.approx(320 / 400)
    assert s["prefill_attention_fraction"] == pytest.approx((2 * 4 * 1e4 + 4 * 3600 + 2 * 3600) / (4 * 4 * 1e4))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert tail_nll(logits, torch.tensor([1])) == pytest.approx(-math.log(0.75))


def test_runs_on_attention_metadata_positions(model):
    """Dropping tokens keeps their neighbours' positions: the kept rows' RoPE uses the original positions."""
    kept = torch.tensor([0, 3, 4, 9])
    meta = AttentionMetadata(positions=kept, query_start=[0, 4], context_lens=[4])
    h = model.embed(IDS[kept], kept)
    out = model.layers[0](h, meta, None, model.rotary.prepare(kept))
    shifted = model.layers[0](h, AttentionMetadata.uncached([4]), None, model.rotary.prepare(torch.arange(4)))
    assert not torch.allclose(out, shifted)
