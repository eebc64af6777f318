"""Hugging Face DeepSeek-V2 / V3 checkpoints (weights/hf_deepseek.py), saved by transformers itself: logits equal
transformers' (latent attention with and without q_lora_rank, interleaved and half RoPE, YaRN with DeepSeek's
mscale, dense first layers, routed experts with routing that depends on the token); a published config reads as
DeepSeek documents it; options loom does not implement and broken files fail with the file and key named."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loom.layers.mla import MLAttention
from loom.layers.moe import expert_token_counts
from loom.weights.errors import WeightsError
from loom.weights.hf import config_from_hf
from loom.weights.loader import load_model
from tests.helpers import hf_logits, save_tiny_deepseek

IDS = list(range(3, 240, 7))  # 34 tokens
LONG = [(i * 37) % 250 for i in range(200)]  # past YaRN's original context of 64 below

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.8}
CASES = {
    "v2": ("deepseek_v2", {}),
    "v2-q-proj": ("deepseek_v2", dict(q_lora_rank=None)),
    "v2-group-limited-biases": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                    routed_scaling_factor=1.5, attention_bias=True)),
    "v2-yarn-mscale": ("deepseek_v2", dict(rope_parameters=YARN, max_position_embeddings=256)),
    "v2-dense": ("deepseek_v2", dict(first_k_dense_replace=3, tie_word_embeddings=True)),
    "v3": ("deepseek_v3", {}),
    "v3-q-proj-rope-halves": ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, n_shared_experts=0)),
    "v3-one-group": ("deepseek_v3", dict(n_group=1, topk_group=1, norm_topk_prob=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = save_tiny_deepseek(str(tmp_path), model_type, **overrides)
    loaded = load_model(str(tmp_path))
    c, model = loaded.config, loaded.model
    assert c.architecture == model_type and c.is_mla and all(isinstance(l.attn, MLAttention) for l in model.layers)
    ids = LONG if "yarn" in case else IDS
    got = model.logits(torch.tensor(ids))
    want = hf_logits(hf, ids)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    counts = expert_token_counts(model)
    if case == "v2-dense":
        assert counts == {} and c.num_experts == 0
        return
    assert sorted(counts) == [1, 2]  # first_k_dense_replace = 1: layer 0 is dense
    assert all(sum(n) == len(ids) * c.num_experts_per_tok for n in counts.values())
    assert all(sum(x > 0 for x in n) > c.num_experts_per_tok for n in counts.values())  # routing varies by token
    assert c.rope_interleave == (case != "v3-q-proj-rope-halves")
    assert c.kv_bytes_per_token(4) == (16 + 4) * 3 * 4


def test_routing_and_scale_are_what_make_them_equal(tmp_path):
    """A wrong routed scale, score bias, softmax scale or RoPE layout changes the logits: the comparison above would
    see them."""
    hf = save_tiny_deepseek(str(tmp_path), "deepseek_v3")
    want = hf_logits(hf, IDS)
    loaded = load_model(str(tmp_path))
    for change in ("scale", "bias", "softmax", "rope halves"):
        model = load_model(str(tmp_path)).model
        for layer in model.layers:
            if change == "softmax":
                layer.attn.scale *= 1.1
            elif change == "rope halves":
                layer.attn.interleave = False
            elif layer.mlp.__class__.__name__ == "MoE":
                if change == "scale":
                    layer.mlp.routed_scale = 1.0
                else:
                    layer.mlp.score_bias.zero_()
        assert (model.logits(torch.tensor(IDS)) - want).abs().max() > 5e-3 * want.abs().max(), change
    assert (loaded.model.logits(torch.tensor(IDS)) - want).abs().max() < 1e-4 * want.abs().max()


def test_yarn_mscale_sets_the_rope_factor_and_the_softmax_scale(tmp_path):
    save_tiny_deepseek(str(tmp_path), "deepseek_v2", rope_parameters=YARN, max_position_embeddings=256)
    c = load_model(str(tmp_path)).config
    mscale = lambda m: 0.1 * m * math.log(4.0) + 1  # noqa: E731
    assert c.rope_scaling.attention_factor == pytest.approx(mscale(1.0) / mscale(0.8))
    assert c.attn_scale == pytest.approx(12 ** -0.5 * mscale(0.8) ** 2)
    assert c.max_position_embeddings == 256


def test_a_published_config_reads_as_documented():
    """DeepSeek-V2-Lite's config.json (as published, before transformers rewrote its keys): no tensors needed."""
    cfg = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
           "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
           "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
           "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
           "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
           "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 163840,
           "rms_norm_eps": 1e-06, "rope_theta": 10000, "attention_bias": False, "tie_word_embeddings": False,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "bos_token_id": 100000, "eos_token_id": 100001}
    c = config_from_hf(cfg)
    assert (c.kv_lora_rank, c.q_lora_rank, c.head_dim, c.rotary_dim, c.v_head_dim) == (512, 0, 192, 64, 128)
    assert c.moe_layers == (False,) + (True,) * 26 and c.shared_expert_intermediate_size == 2 * 1408
    assert c.max_position_embeddings == 163840 and c.rope_scaling.attention_factor == pytest.approx(1.0)
    assert c.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)
    assert c.kv_bytes_per_token(2) == 27 * (512 + 64) * 2  # 31,104 B per token in bf16
    assert c.mha_kv_bytes_per_token(2) == 27 * 16 * (192 + 128) * 2  # 276,480 B: 8.9x more
    assert 15.6e9 < c.num_parameters() < 15.8e9 and 2.6e9 < c.num_parameters(active=True) < 2.7e9  # "16B, 2.4B"


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("model_type,changes,match", [
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method is 'noaux_tc': not implemented for deepseek_v2"),
    ("deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func is 'sigmoid': not implemented for deepseek_v2"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func is 'softmax': not implemented for deepseek_v3"),
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method is 'greedy'"),
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob is true"),
    ("deepseek_v2", dict(mlp_bias=True), "mlp_bias is true"),
    ("deepseek_v3", dict(n_group=3), "n_group 3 must divide n_routed_experts"),
    ("deepseek_v2", dict(num_experts_per_tok=9), "num_experts_per_tok is 9; expected at most n_routed_experts"),
    ("deepseek_v2", dict(kv_lora_rank=None), "kv_lora_rank"),
    ("deepseek_v2", dict(qk_rope_head_dim=5), "qk_rope_head_dim is 5"),
    ("deepseek_v2", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "mscale_all_dim": 1.0}),
     "mscale / mscale_all_dim are YaRN's"),
    ("deepseek_v2", dict(kv_lora_rank=12), r"kv_a_proj_with_mqa\.weight.*shape \(20, 64\) does not match"),
])
def test_unsupported_or_wrong_options_name_the_file_and_key(tmp_path, model_type, changes, match):
    save_tiny_deepseek(str(tmp_path), model_type)
    edit_config(tmp_path, **changes)
    with pytest.raises(WeightsError, match=match) as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_v3_multi_token_prediction_layers_are_stored_but_not_run(tmp_path):
    """Published DeepSeek-V3 checkpoints store the multi-token-prediction module as one more layer after the
    decoder's (num_nextn_predict_layers: 1; transformers does not run it either). loom loads the decoder, ignores
    that layer, and still refuses a file whose extra layer the config does not announce."""
    from safetensors.torch import load_file, save_file

    model = save_tiny_deepseek(str(tmp_path), "deepseek_v3")
    n = model.config.num_hidden_layers
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors |= {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v.clone()
                for k, v in tensors.items() if k.startswith(f"model.layers.{n - 1}.")}
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(model.config.hidden_size, 2 * model.config.hidden_size)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    for count in (0, None):
        (tmp_path / "config.json").write_text(json.dumps(cfg | {"num_nextn_predict_layers": count}))
        with pytest.raises(WeightsError, match=f"num_hidden_layers is {n}"):
            load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"num_nextn_predict_layers": 1}))
    loaded = load_model(str(tmp_path))
    assert len(loaded.model.layers) == n
    want = hf_logits(model, IDS)
    got = loaded.model.logits(torch.tensor(IDS))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
