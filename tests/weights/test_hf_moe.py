"""Hugging Face MoE checkpoints (mixtral, qwen2_moe with its shared expert and dense layers, qwen3_moe with its
per-head QK-norm, olmoe with its whole-projection QK-norm), saved by transformers itself: logits equal
transformers' on the same weights, with routing that depends on the token; options loom does not implement and
broken files fail with the file and key named."""

from __future__ import annotations

import json

import pytest
import torch

from loom.layers.moe import expert_token_counts
from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from tests.helpers import hf_logits, save_tiny_moe

IDS = list(range(3, 240, 7))  # 34 tokens

CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-window": ("mixtral", dict(sliding_window=8)),
    "qwen2_moe-shared": ("qwen2_moe", {}),
    "qwen2_moe-renorm-dense-layers": ("qwen2_moe", dict(num_hidden_layers=4, num_experts=6, norm_topk_prob=True,
                                                        decoder_sparse_step=2, mlp_only_layers=[3])),
    "qwen2_moe-no-shared": ("qwen2_moe", dict(shared_expert_intermediate_size=0)),
    "qwen2_moe-window": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=6, max_window_layers=2)),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-renorm-dense-layers-window": ("qwen3_moe", dict(num_hidden_layers=3, norm_topk_prob=True,
                                                               mlp_only_layers=[1], use_sliding_window=True,
                                                               sliding_window=8)),
    "olmoe": ("olmoe", {}),
    "olmoe-renorm-top3-of-8": ("olmoe", dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                             num_key_value_heads=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = save_tiny_moe(str(tmp_path), model_type, **overrides)
    loaded = load_model(str(tmp_path))
    c = loaded.config
    assert loaded.config.architecture == model_type and c.num_experts == hf.config.num_experts
    got = loaded.model.logits(torch.tensor(IDS))
    want = hf_logits(hf, IDS)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    counts = expert_token_counts(loaded.model)
    assert all(sum(n) == len(IDS) * c.num_experts_per_tok for n in counts.values())
    assert all(sum(x > 0 for x in n) > c.num_experts_per_tok for n in counts.values())  # routing varies by token
    if case == "qwen2_moe-renorm-dense-layers":  # layers 1 (step 2) is MoE; 0, 2 (step) and 3 (listed) are dense
        assert sorted(counts) == [1] and c.moe_layers == (False, True, False, False)
    if model_type == "qwen2_moe" and c.shared_expert_intermediate_size:
        assert loaded.model.layers[1].mlp.shared_expert is not None
    assert c.qk_norm_full == (model_type == "olmoe") and c.qk_norm == (model_type == "qwen3_moe")
    if case == "qwen3_moe-renorm-dense-layers-window":
        assert sorted(counts) == [0, 2] and c.sliding_window == 8


def test_routing_is_what_makes_them_equal(tmp_path):
    """Renormalizing or not changes the logits: the comparison above would see a wrong norm_topk_prob."""
    hf = save_tiny_moe(str(tmp_path), "olmoe")
    loaded = load_model(str(tmp_path))
    for layer in loaded.model.layers:
        layer.mlp.normalize = True
    assert (loaded.model.logits(torch.tensor(IDS)) - hf_logits(hf, IDS)).abs().max() > 1e-3


def test_sharded_and_bfloat16(tmp_path):
    hf = save_tiny_moe(str(tmp_path / "a"), "mixtral", shards=3)
    want = hf_logits(hf, IDS)
    assert (load_model(str(tmp_path / "a")).model.logits(torch.tensor(IDS)) - want).abs().max() < 1e-4
    got = load_model(str(tmp_path / "a"), dtype="bfloat16").model.logits(torch.tensor(IDS)).float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("model_type,changes,match", [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv is 8.0: clipping q, k and v is not implemented"),
    ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok is 5; expected at most num_local_experts"),
    ("qwen2_moe", dict(num_experts=None), "num_experts"),
    ("qwen2_moe", dict(scoring_func="sigmoid"), "scoring_func is 'sigmoid'"),
    ("qwen2_moe", dict(norm_topk_prob="yes"), "norm_topk_prob is 'yes'; expected true or false"),
    ("qwen2_moe", dict(mlp_only_layers="all"), "mlp_only_layers is 'all'"),
    ("mixtral", dict(num_local_experts=3), r"num_local_experts|shape"),
])
def test_unsupported_or_wrong_options_name_the_file_and_key(tmp_path, model_type, changes, match):
    save_tiny_moe(str(tmp_path), model_type)
    edit_config(tmp_path, **changes)
    with pytest.raises(WeightsError, match=match) as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_expert_and_wrong_expert_shape_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_moe(str(tmp_path), "qwen2_moe")
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    del sd[name]
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'.*missing"):
        load_model(str(tmp_path))
    sd[name] = torch.zeros(7, 64)
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"experts\.3\.up_proj\.weight.*shape \(7, 64\) does not match the config's "
                                           r"\(32, 64\)"):
        load_model(str(tmp_path))
    sd[name] = torch.zeros(32, 64)
    sd["model.layers.0.mlp.shared_expert_gate.weight"] = torch.zeros(2, 64)
    save_file(sd, str(path))
    with pytest.raises(WeightsError,
                       match=r"shared_expert_gate\.weight.*\(2, 64\) does not match the config's \(1, 64\)"):
        load_model(str(tmp_path))
