"""Pruning a whole (tiny random) model: every projection meets its target, layers are calibrated
sequentially on the pruned layers before them, embeddings and head stay dense, and the result saves
and loads back exactly, pruned or pruned and quantized."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from loom.compress.calibration import LayerwiseCalibration
from loom.compress.prune.masks import NMPattern, PruningError
from loom.compress.prune.methods import PruneRecipe, linear_sparsity, prune
from loom.compress.prune.wanda import InputNorms, wanda_mask
from loom.compress.quantize.rtn import QuantConfig
from loom.layers.linear import Linear
from loom.layers.quantized import QuantizedLinear
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint
from tests.helpers import save_tiny_hf

LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_hf(folder, "llama", num_key_value_heads=2)
    return load_model(folder).model


@pytest.fixture(scope="module")
def samples() -> torch.Tensor:
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def _parts(model, i: int, name: str) -> list[torch.Tensor]:
    """The model's own projections (q, k, v / gate, up / o / down) of a (fused) pruned linear."""
    w = model.layers[i].get_submodule(name).dequantized_weight()
    sizes = model.fused_row_splits().get(f"layers.{i}.{name}.weight", [w.shape[0]])
    return list(torch.split(w, sizes))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)], ids=str)
def test_every_projection_meets_the_target(tiny, samples, method, target):
    model = prune(copy.deepcopy(tiny), PruneRecipe(method, target), samples)
    for i in range(model.config.num_layers):
        for name in LINEARS:
            assert type(model.layers[i].get_submodule(name)) is Linear
            for w in _parts(model, i, name):
                zeros = w == 0
                if isinstance(target, NMPattern):
                    assert (zeros.view(w.shape[0], -1, 4).sum(dim=-1) == 2).all(), (method, i, name)
                elif method == "wanda":  # per output row
                    assert (zeros.sum(dim=1) == w.shape[1] // 2).all(), (i, name)
                else:  # per projection (SparseGPT: per block of 128 columns, here the whole width)
                    assert int(zeros.sum()) == w.numel() // 2, (method, i, name)
    assert linear_sparsity(model) == 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_embeddings_head_and_norms_stay_dense(tiny, samples, method):
    model = prune(copy.deepcopy(tiny), PruneRecipe(method, 0.5, QuantConfig(4, 32)), samples)
    untouched = [n for n, _ in tiny.named_parameters() if not any(part in n for part in LINEARS)]
    assert "embed_tokens.weight" in untouched and any("norm" in n for n in untouched)
    mine = dict(model.named_parameters())
    for name, p in tiny.named_parameters():
        if name in untouched:
            assert torch.equal(mine[name], p), name
    assert (model.lm_head is None) == (tiny.lm_head is None)


def test_layers_are_calibrated_on_the_pruned_layers_before_them(tiny, samples):
    """Layer 1's Wanda masks come from inputs computed by the already pruned layer 0."""
    model = prune(copy.deepcopy(tiny), PruneRecipe("wanda", 0.5), samples)
    reference = copy.deepcopy(tiny)
    reference.layers[0] = model.layers[0]
    calib = LayerwiseCalibration(reference, samples)
    calib.advance()
    qkv = reference.layers[1].attn.qkv_proj
    norms = InputNorms(qkv.in_features)
    calib.run({qkv: norms.add})
    want = wanda_mask(tiny.layers[1].attn.qkv_proj.weight, norms.value(), 0.5)
    assert torch.equal(model.layers[1].attn.qkv_proj.weight == 0, want)
    dense_inputs = LayerwiseCalibration(tiny, samples)
    dense_inputs.advance()
    unpruned = InputNorms(qkv.in_features)
    dense_inputs.run({tiny.layers[1].attn.qkv_proj: unpruned.add})
    assert not torch.equal(wanda_mask(tiny.layers[1].attn.qkv_proj.weight, unpruned.value(), 0.5), want)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_rtn_after_pruning_keeps_the_zeros(tiny, samples, method):
    """Layer 0 sees the same inputs either way, so its masks match; later layers see a quantized layer 0."""
    pruned = prune(copy.deepcopy(tiny), PruneRecipe(method, 0.5), samples)
    both = prune(copy.deepcopy(tiny), PruneRecipe(method, 0.5, QuantConfig(4, 32)), samples)
    for name in LINEARS:
        dense, quant = pruned.layers[0].get_submodule(name), both.layers[0].get_submodule(name)
        assert isinstance(quant, QuantizedLinear)
        assert (quant.dequantized_weight()[dense.weight == 0] == 0).all(), name
    assert linear_sparsity(both) >= 0.5


@pytest.mark.parametrize("quant", [None, QuantConfig(4, 32)], ids=["dense", "w4g32"])
def test_save_and_load_round_trip_is_exact(tiny, samples, tmp_path, quant):
    recipe = PruneRecipe("sparsegpt", NMPattern(2, 4), quant, backend="reference")
    model = prune(copy.deepcopy(tiny), recipe, samples)
    out = str(tmp_path / "pruned")
    save_checkpoint(model, out, recipe.quantization_metadata(), pruning=recipe.metadata())
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["pruning"] == {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5,
                              "sparsegpt": {"block_size": 128, "damp": 0.01}}
    assert ("quantization_config" in cfg) == (quant is not None)
    back = load_model(out, weights="native").model
    for i in range(tiny.config.num_layers):
        for name in LINEARS:
            a, b = model.layers[i].get_submodule(name), back.layers[i].get_submodule(name)
            assert type(a) is type(b) and torch.equal(a.dequantized_weight(), b.dequantized_weight()), (i, name)
    ids = torch.arange(12)
    with torch.no_grad():
        assert torch.equal(model.logits(ids), back.logits(ids))


def test_bad_recipes_are_refused(tiny, samples):
    with pytest.raises(PruningError, match="unknown pruning method"):
        PruneRecipe("random", 0.5)
    with pytest.raises(PruningError, match=r"\[0, 1\)"):
        PruneRecipe("wanda", 1.0)
    with pytest.raises(PruningError, match="does not divide the input size 64"):
        prune(copy.deepcopy(tiny), PruneRecipe("magnitude", NMPattern(2, 5)))
    with pytest.raises(PruningError, match="needs calibration"):
        prune(copy.deepcopy(tiny), PruneRecipe("wanda", 0.5))
    quantized = prune(copy.deepcopy(tiny), PruneRecipe("magnitude", 0.5, QuantConfig(4, 32)))
    with pytest.raises(PruningError, match="not a dense linear"):
        prune(quantized, PruneRecipe("magnitude", 0.5))
