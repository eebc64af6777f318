"""SparseGPT on one layer with correlated inputs: it prunes to the target exactly, beats magnitude and
Wanda on the layer's output error, changes nothing at sparsity 0, and in joint mode keeps its mask with
weights on the quantization grid (and, at sparsity 0, is GPTQ)."""

from __future__ import annotations

import pytest
import torch

from loom.compress.prune.magnitude import magnitude_mask
from loom.compress.prune.masks import NMPattern, PruningError
from loom.compress.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from loom.compress.prune.wanda import InputNorms, wanda_mask
from loom.compress.quantize.gptq import GPTQConfig, Hessian, gptq_quantize, layer_output_error
from loom.compress.quantize.rtn import QuantConfig, rtn_quantize

N, K, TOKENS = 48, 192, 1024


@pytest.fixture(scope="module")
def layer():
    """Inputs driven by 16 latent factors plus noise, channels of uneven scale (as in real activations)."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(TOKENS, 16, generator=g)
    x = (latent @ torch.randn(16, K, generator=g) + 0.3 * torch.randn(TOKENS, K, generator=g))
    x = x * torch.linspace(0.2, 3.0, K)
    w = torch.randn(N, K, generator=g)
    h = Hessian(K)
    h.add(x[:500])
    h.add(x[500:])
    norms = InputNorms(K)
    norms.add(x)
    return x, w, h.value(), norms.value()


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)], ids=str)
def test_sparsegpt_beats_magnitude_and_wanda(layer, target):
    x, w, h, norms = layer
    errors = {"magnitude": layer_output_error(x, w, w.masked_fill(magnitude_mask(w, target), 0.0)),
              "wanda": layer_output_error(x, w, w.masked_fill(wanda_mask(w, norms, target), 0.0)),
              "sparsegpt": layer_output_error(x, w, sparsegpt_prune(w, h, target).weight)}
    assert errors["sparsegpt"] < 0.5 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def test_unstructured_sparsity_is_exact_per_block(layer):
    _, w, h, _ = layer
    r = sparsegpt_prune(w, h, 0.5, SparseGPTConfig(block_size=64))
    assert torch.equal(r.weight == 0, r.mask)
    assert (r.mask.view(N, K // 64, 64).sum(dim=(0, 2)) == N * 32).all()  # s of each block, rows pooled
    assert not torch.equal(r.weight[~r.mask], w[~r.mask])  # the kept weights absorbed the error


def test_nm_pattern_holds_in_every_group(layer):
    _, w, h, _ = layer
    for pattern in (NMPattern(2, 4), NMPattern(4, 8)):
        r = sparsegpt_prune(w, h, pattern)
        zeros = (r.weight == 0).view(N, K // pattern.m, pattern.m).sum(dim=-1)
        assert (zeros == pattern.n).all(), pattern


def test_sparsity_zero_changes_nothing(layer):
    _, w, h, _ = layer
    r = sparsegpt_prune(w, h, 0.0)
    assert not r.mask.any() and r.quantized is None
    torch.testing.assert_close(r.weight, w, rtol=0, atol=1e-6)


def test_joint_quantization_keeps_the_mask_on_the_grid(layer):
    x, w, h, _ = layer
    q = QuantConfig(4, 32)
    r = sparsegpt_prune(w, h, 0.5, quant=q)
    qt = r.quantized
    assert qt is not None and qt.bits == 4 and qt.group_size == 32
    assert torch.equal(qt.dequantize(), r.weight)  # the dense result is exactly the stored codes' weight
    assert (r.weight[r.mask] == 0).all() and int(r.mask.sum()) == N * K // 2
    zero_points = -qt.offsets / qt.scales
    torch.testing.assert_close(zero_points, zero_points.round())  # an integer zero point per group
    per_weight = zero_points.round().repeat_interleave(32, dim=1)
    assert torch.equal(qt.codes.float()[r.mask], per_weight[r.mask])  # a pruned weight's code is the zero point
    # joint beats pruning first and rounding afterwards
    apart = rtn_quantize(sparsegpt_prune(w, h, 0.5).weight, q).dequantize()
    assert layer_output_error(x, w, r.weight) < layer_output_error(x, w, apart)


def test_joint_mode_at_sparsity_zero_is_gptq(layer):
    _, w, h, _ = layer
    q = QuantConfig(4, 32)
    r = sparsegpt_prune(w, h, 0.0, quant=q)
    g = gptq_quantize(w, h, q, GPTQConfig(act_order=False))
    assert torch.equal(r.quantized.codes, g.codes)
    torch.testing.assert_close(r.quantized.scales, g.scales)


def test_block_size_must_hold_whole_groups_of_m(layer):
    _, w, h, _ = layer
    with pytest.raises(PruningError, match="not a multiple of M"):
        sparsegpt_prune(w, h, NMPattern(2, 4), SparseGPTConfig(block_size=6))
