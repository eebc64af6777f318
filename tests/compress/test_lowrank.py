"""Low-rank factorization of a whole (tiny random) model: the factors are the truncated SVD, the budget
arithmetic holds, ASVD beats SVD on the output error where channels are skewed, full rank changes nothing,
and a factorized checkpoint loads back bit for bit (a bad factor shape is a WeightsError naming the tensor)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.compress.lowrank import (PROJECTIONS, LowRankConfig, LowRankError, asvd_scale, decoder_linear_fraction,
                                   factorize, rank_for_budget, relative_errors, svd_factors)
from loom.layers.linear import Linear
from loom.layers.lowrank import FusedLinear, LowRankLinear
from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint
from tests.helpers import save_tiny_hf

SLOTS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q|k|v biases
def tiny(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    save_tiny_hf(folder, request.param, num_key_value_heads=2)
    return load_model(folder).model


@pytest.fixture(autouse=True)
def one_thread():
    """LAPACK's SVD on one thread, as factorize runs it (two busy OpenMP threads make small SVDs 10-80x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samples() -> torch.Tensor:
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


IDS = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1))


def test_rank_for_budget():
    assert rank_for_budget(576, 576, 0.5) == 144  # a square matrix keeps half at a quarter of its rank
    assert rank_for_budget(576, 576, 0.9) == 259
    assert rank_for_budget(192, 576, 0.9) == 129  # floor(0.9 * 192 * 576 / 768) = floor(129.6)
    assert rank_for_budget(2, 2, 1.0) == 1  # r (out + in) == keep out in exactly: still within
    assert rank_for_budget(100, 100, 0.01) == 0  # rank 1 costs 200 > 100
    for out, n_in in ((64, 64), (32, 64), (128, 64), (64, 128), (49, 17)):
        for keep in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            r = rank_for_budget(out, n_in, keep)
            assert r * (out + n_in) <= keep * out * n_in < (r + 1) * (out + n_in)


def test_svd_factors_are_the_truncated_svd():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for r in (1, 7, 32):
        down, up = svd_factors(w, r)
        assert down.shape == (r, 32) and up.shape == (48, r) and down.dtype == torch.float32
        naive = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        assert torch.allclose(up.double() @ down.double(), naive, atol=1e-5)
        # Eckart-Young: the error is the singular values left out
        err, _ = relative_errors(w, down, up, None)
        assert err == pytest.approx(float(s[r:].norm() / s.norm()), abs=1e-6)


def test_asvd_beats_svd_on_the_output_where_input_channels_are_skewed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    channel_scale = torch.logspace(-2, 1.5, 96)[torch.randperm(96, generator=g)]  # a few loud channels
    x = torch.randn(2048, 96, generator=g) * channel_scale
    x_test = torch.randn(2048, 96, generator=g) * channel_scale  # same distribution, other draws
    for alpha in (0.5, 1.0):
        scale = asvd_scale(x.abs().mean(dim=0), alpha)
        for r in (8, 24):
            plain, aware = svd_factors(w, r), svd_factors(w, r, scale)
            out_err = [float((x_test @ (w - up @ down).t()).norm()) for down, up in (plain, aware)]
            assert out_err[1] < 0.8 * out_err[0], (alpha, r, out_err)
            # ... and plain SVD stays optimal for the weight itself (Eckart-Young)
            assert float((w - plain[1] @ plain[0]).norm()) <= float((w - aware[1] @ aware[0]).norm())


def test_asvd_scale_survives_dead_channels():
    s = asvd_scale(torch.tensor([0.0, 4.0, 1.0]), 0.5)
    assert torch.all(s > 0) and s[1] == 2.0 and s[2] == 1.0
    assert torch.equal(asvd_scale(torch.zeros(3), 0.5), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_factors_match_the_truncated_svd_of_each_projection(tiny, samples, method):
    model = copy.deepcopy(tiny)
    before = {f"{i}.{s}": model.layers[i].get_submodule(s).weight.detach().clone()
              for i in range(model.config.num_layers) for s in SLOTS}
    report = factorize(model, LowRankConfig(0.5, method), samples)
    assert len(report.layers) == 7 * model.config.num_layers
    for i in range(model.config.num_layers):
        for slot in SLOTS:
            module = model.layers[i].get_submodule(slot)
            parts = list(module.parts) if isinstance(module, FusedLinear) else [module]
            sizes = model.fused_row_splits().get(f"layers.{i}.{slot}.weight", [module.out_features])
            assert all(isinstance(p, LowRankLinear) for p in parts) and [p.out_features for p in parts] == sizes
            for part, w in zip(parts, torch.split(before[f"{i}.{slot}"], sizes)):
                assert part.rank == rank_for_budget(*w.shape, 0.5)
                if method == "svd":
                    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                    naive = (u[:, :part.rank] * s[:part.rank]) @ vh[:part.rank]
                    assert torch.allclose(part.dequantized_weight().double(), naive, atol=1e-5)
    kept = sum(r.params_after for r in report.layers) / sum(r.params_before for r in report.layers)
    assert report.fraction_kept == pytest.approx(kept) and 0.45 < kept <= 0.5
    assert decoder_linear_fraction(model) == pytest.approx(report.fraction_kept)
    assert all(0 < r.weight_error < 1 and 0 < r.output_error < 1 for r in report.layers)
    assert model.lm_head is None or type(model.lm_head) is Linear  # the output layer is never factorized


def test_full_rank_reproduces_the_model(tiny, samples):
    model = copy.deepcopy(tiny)
    want = model.logits(IDS)
    report = factorize(model, LowRankConfig(method="asvd", rank=10 ** 6), samples)
    assert all(r.rank == min(r.out_features, r.in_features) for r in report.layers)
    assert (model.logits(IDS) - want).abs().max() < 1e-5


def test_save_and_load_round_trip_bit_for_bit(tiny, samples, tmp_path):
    model = copy.deepcopy(tiny)
    config = LowRankConfig(0.75, "asvd")
    report = factorize(model, config, samples)
    save_checkpoint(model, str(tmp_path), lowrank=config.metadata())
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["lowrank"]["method"] == "asvd"
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.lowrank_up" in stored and "model.layers.0.mlp.gate_proj.weight" not in stored
    assert sum(t.numel() for n, t in stored.items() if ".lowrank_" in n) == report.params_after
    loaded = load_model(str(tmp_path)).model
    assert torch.equal(loaded.logits(IDS), model.logits(IDS))
    mine, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_factorized_checkpoint_loads_in_bf16(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    factorize(model, LowRankConfig(0.5, targets=("q_proj", "o_proj", "down_proj")))  # dense parts in a fused one
    save_checkpoint(model, str(tmp_path), lowrank={"method": "svd"})
    bf16 = load_model(str(tmp_path), weights="bf16").model
    assert bf16.layers[0].attn.o_proj.down.dtype == torch.bfloat16
    want = model.logits(IDS)
    assert (bf16.logits(IDS).float() - want).abs().max() < 0.05 * want.abs().max()


def test_some_targets_only_keep_the_others_dense(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    want_k = model.layers[0].attn.qkv_proj.weight.detach()[model.config.q_size:].clone()
    report = factorize(model, LowRankConfig(0.5, targets=("q_proj", "down_proj")))
    qkv = model.layers[0].attn.qkv_proj
    assert [type(p) for p in qkv.parts] == [LowRankLinear, Linear, Linear]
    assert torch.equal(torch.cat([p.weight for p in qkv.parts[1:]]), want_k)
    assert type(model.layers[0].mlp.gate_up_proj) is Linear and type(model.layers[0].attn.o_proj) is Linear
    assert {r.name.rpartition(".")[2] for r in report.layers} == {"q_proj", "down_proj"}
    assert 0.5 < report.fraction_kept < 1
    save_checkpoint(model, str(tmp_path), lowrank=report.config.metadata())
    assert torch.equal(load_model(str(tmp_path)).model.logits(IDS), model.logits(IDS))


def test_a_bad_factor_shape_is_a_weights_error_naming_the_tensor(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    factorize(model, LowRankConfig(0.5))
    save_checkpoint(model, str(tmp_path), lowrank={"method": "svd"})
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.lowrank_down"
    tensors[name] = tensors[name][:-1].contiguous()  # one rank fewer than its up factor
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=f"model.safetensors.*{name}.*one rank r"):
        load_model(str(tmp_path))
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=f"{name}.*without its other factor"):
        load_model(str(tmp_path))


def test_refusals(tiny):
    with pytest.raises(LowRankError, match="needs calibration"):
        factorize(copy.deepcopy(tiny), LowRankConfig(method="asvd"))
    with pytest.raises(LowRankError, match="unknown low-rank method"):
        LowRankConfig(method="tucker")
    with pytest.raises(LowRankError, match=r"keep must be in \(0, 1\]"):
        LowRankConfig(keep=1.5)
    with pytest.raises(LowRankError, match="not decoder projections"):
        LowRankConfig(targets=("lm_head",))
    with pytest.raises(LowRankError, match="leaves no rank"):
        factorize(copy.deepcopy(tiny), LowRankConfig(keep=0.001))
    model = copy.deepcopy(tiny)
    factorize(model, LowRankConfig(0.5, targets=("o_proj",)))
    with pytest.raises(LowRankError, match="not a dense Linear"):
        factorize(model, LowRankConfig(0.5))
    assert set(PROJECTIONS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
