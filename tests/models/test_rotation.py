"""The residual-stream rotation (models/rotation.py) changes no logit in exact arithmetic, and it makes
per-token int8 activations lose less."""

from __future__ import annotations

import math

import pytest
import torch

from loom.config import ModelConfig
from loom.models.rotation import hadamard, power_of_two_part, residual_rotation, rotate, rotation_problem
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
            max_position_embeddings=64)


def test_hadamard_and_the_residual_rotation_are_orthogonal():
    h = hadamard(16) / 4
    assert torch.allclose(h @ h.t(), torch.eye(16, dtype=torch.float64))
    q = residual_rotation(576)
    assert torch.allclose(q @ q.t(), torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert power_of_two_part(576) == 64 and power_of_two_part(1536, cap=512) == 512 and power_of_two_part(9) == 1
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
                                   dict(tie_word_embeddings=True, num_kv_heads=1), dict(position="learned"),
                                   dict(hidden_size=64, num_kv_heads=2, qkv_bias=True)])  # head size 16: V rotated
def test_rotation_keeps_the_logits(extra):
    """fp32, the whole forward: the rotated model computes what the original did (to rounding)."""
    model = Transformer(ModelConfig(**{**BASE, **extra})).init_random(0, std=0.2)
    with torch.no_grad():  # norms that matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(0, 97, (20,))
    with torch.no_grad():
        want = model.logits(ids)
        online = rotate(model)
        for name, block in online.items():  # what the int8 quantizer does on the fly: x -> x B
            down = model.get_submodule(name)
            b = (torch.block_diag(*[hadamard(block)] * (down.in_features // block)) / math.sqrt(block)).float()
            down.forward = lambda x, down=down, b=b: torch.nn.functional.linear(x @ b, down.weight, down.bias)
        got = model.logits(ids)
    assert set(online) == {"layers.0.mlp.down_proj", "layers.1.mlp.down_proj"}
    assert all(b == 32 for b in online.values())  # 96 = 3 x 32
    # every norm weight is folded (but the final one), and the weights really changed
    assert all(bool((l.attn_norm.weight == 1).all() and (l.mlp_norm.weight == 1).all()) for l in model.layers)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_rotation_is_refused_where_the_norm_does_not_commute():
    model = Transformer(ModelConfig(**BASE, norm="layernorm")).init_random(0)
    assert "RMSNorm" in rotation_problem(model)
    with pytest.raises(ValueError, match="cannot rotate"):
        rotate(model)


def test_rotation_spreads_outlier_channels():
    """A hidden state with one huge channel: after Q its largest entry is a small fraction of the norm,
    which is what lets one int8 scale per token keep the other channels."""
    h = torch.randn(8, 576, dtype=torch.float64)
    h[:, 7] = 300.0
    q = residual_rotation(576)
    before = (h.abs().amax(1) / h.norm(dim=1)).min()
    after = ((h @ q).abs().amax(1) / h.norm(dim=1)).max()
    assert before > 0.9 and after < 0.5 / math.sqrt(9) * 3
