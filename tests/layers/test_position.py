"""Position encodings against their formulas (and HF's RoPE scaling code as an independent reference)."""

from __future__ import annotations

import math

import pytest
import torch

from loom.config import RopeScaling
from loom.layers.position import RotaryEmbedding, alibi_bias, alibi_slopes, rope_inv_freq, sinusoidal_table


def rotate_pairs(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """RoPE by definition: pair (x_i, x_{i+d/2}) rotated by pos * base^(-2i/d)."""
    d = x.shape[-1]
    out = x.clone().double()
    for i in range(d // 2):
        a = pos * base ** (-2 * i / d)
        x1, x2 = x[..., i].double(), x[..., i + d // 2].double()
        out[..., i] = x1 * math.cos(a) - x2 * math.sin(a)
        out[..., i + d // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def test_rope_matches_rotation_definition():
    rope = RotaryEmbedding(16, 16, 10000.0, 64)
    x = torch.randn(5, 3, 16)
    pos = torch.tensor([0, 1, 7, 30, 63])
    got = rope.apply(x, rope.prepare(pos))
    for t, p in enumerate(pos.tolist()):
        torch.testing.assert_close(got[t].double(), rotate_pairs(x[t], p, 10000.0), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_distance():
    rope = RotaryEmbedding(32, 32, 500.0, 16)  # tables grow on demand past 16
    q, k = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    def score(m: int, n: int) -> float:
        qm = rope.apply(q, rope.prepare(torch.tensor([m])))
        kn = rope.apply(k, rope.prepare(torch.tensor([n])))
        return float((qm * kn).sum())
    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)
    assert score(5, 5) == pytest.approx(score(0, 0), rel=1e-5)


def test_partial_rotary_leaves_the_rest():
    rope = RotaryEmbedding(16, 8, 10000.0, 32)
    x = torch.randn(2, 1, 16)
    got = rope.apply(x, rope.prepare(torch.tensor([3, 9])))
    assert torch.equal(got[..., 8:], x[..., 8:])
    torch.testing.assert_close(got[1, :, :8].double(), rotate_pairs(x[1, :, :8], 9, 10000.0), atol=1e-5, rtol=1e-5)


def test_linear_scaling_is_position_interpolation():
    plain = RotaryEmbedding(16, 16, 10000.0, 64)
    scaled = RotaryEmbedding(16, 16, 10000.0, 64, RopeScaling("linear", 4.0))
    x = torch.randn(1, 2, 16)
    a = scaled.apply(x, scaled.prepare(torch.tensor([40])))
    b = plain.apply(x, (torch.cos(torch.outer(torch.tensor([10.0]), plain.inv_freq)).repeat(1, 2)[:, None],
                        (torch.sin(torch.outer(torch.tensor([10.0]), plain.inv_freq)).repeat(1, 2) * plain.sign)[:, None]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ntk_changes_the_base():
    d, base, s = 64, 10000.0, 4.0
    inv, factor = rope_inv_freq(d, base, RopeScaling("ntk", s))
    want = 1.0 / ((base * s ** (d / (d - 2))) ** (torch.arange(0, d, 2).float() / d))
    torch.testing.assert_close(inv, want)
    assert factor == 1.0


@pytest.mark.parametrize("kind,factor,extra", [
    ("linear", 2.0, {}), ("yarn", 4.0, {}), ("yarn", 8.0, {}),
    ("yarn", 4.0, {"truncate": False}),  # fractional ramp ends
    ("yarn", 4.0, {"beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3}),
])
def test_scaling_matches_transformers(kind, factor, extra):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": kind, "factor": factor, "rope_theta": 10000.0, **extra}
    if kind == "yarn":
        params["original_max_position_embeddings"] = 512
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=512 * int(factor),
                      rope_parameters=params)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    got_inv, got_factor = rope_inv_freq(64, 10000.0, RopeScaling(kind, factor, original_max_position=512, **extra),
                                        max_position=512 * int(factor))
    torch.testing.assert_close(got_inv, want_inv.float())
    assert got_factor == pytest.approx(want_factor)


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    # Not a power of two: the 8 slopes of n = 8, then every other slope of n = 16.
    s12 = alibi_slopes(12).tolist()
    assert s12[:8] == [2.0 ** -(i + 1) for i in range(8)]
    assert s12[8:] == pytest.approx([2.0 ** -(0.5 + i) for i in range(4)])  # h = 1, 3, 5, 7 of 2^(-8h/16)
    bias = alibi_bias(alibi_slopes(4), torch.tensor([3]), torch.arange(4))
    assert bias[:, 0].tolist() == [[-m * (3 - j) for j in range(4)] for m in alibi_slopes(4).tolist()]


def test_sinusoidal_table():
    pe = sinusoidal_table(50, 16)
    for k in (0, 1, 17, 49):
        for i in range(8):
            assert pe[k, 2 * i].item() == pytest.approx(math.sin(k / 10000 ** (2 * i / 16)), abs=1e-6)
            assert pe[k, 2 * i + 1].item() == pytest.approx(math.cos(k / 10000 ** (2 * i / 16)), abs=1e-6)


def test_tables_start_small_and_grow_to_the_positions_used():
    from loom.layers.position import INITIAL_POSITIONS, RotaryEmbedding

    rope = RotaryEmbedding(64, 64, 10000.0, max_position=1 << 24)  # a 16M context allocates 4,096 rows
    assert rope.cos_cached.shape[0] == INITIAL_POSITIONS
    small = rope.cos_sin(torch.tensor([5, 4095]))
    far = rope.cos_sin(torch.tensor([5, 4095, 10_000]))
    assert rope.cos_cached.shape[0] >= 10_001
    assert torch.equal(small[0], far[0][:2]) and torch.equal(small[1], far[1][:2])
    whole = RotaryEmbedding(64, 64, 10000.0, max_position=16_384)
    whole.ensure(16_384)
    assert torch.equal(whole.cos_sin(torch.tensor([10_000]))[0], far[0][2:])
