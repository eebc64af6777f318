"""Hugging Face checkpoints (llama MHA / GQA / MQA, qwen2 with biases, mistral with a sliding window,
sharded safetensors): logits equal transformers' on the same weights; bad folders fail clearly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from tests.helpers import hf_logits, save_tiny_hf

IDS = list(range(3, 240, 7))  # 34 tokens


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=4)),  # MHA
    ("llama", dict(num_key_value_heads=2)),  # GQA
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # MQA, tied
    ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    ("qwen2", dict(num_key_value_heads=2)),  # q/k/v biases
    ("mistral", dict(num_key_value_heads=2, sliding_window=8)),  # 34 tokens > window
    ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
], ids=["llama-mha", "llama-gqa", "llama-mqa-tied", "llama-bias", "qwen2", "mistral-window", "qwen2-window"])
def test_logits_match_transformers(tmp_path, model_type, overrides):
    hf = save_tiny_hf(str(tmp_path), model_type, **overrides)
    loaded = load_model(str(tmp_path))
    assert loaded.format == "hf" and loaded.config.architecture == model_type
    got = loaded.model.logits(torch.tensor(IDS))
    assert (got - hf_logits(hf, IDS)).abs().max() < 1e-4
    if "sliding_window" in overrides:
        # The window matters here: without it the logits would differ.
        loaded.model.layers[-1].attn.window = None
        assert (loaded.model.logits(torch.tensor(IDS)) - got).abs().max() > 1e-3


def test_sharded_checkpoint(tmp_path):
    hf = save_tiny_hf(str(tmp_path), "llama", shards=3)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    got = load_model(str(tmp_path)).model.logits(torch.tensor(IDS))
    assert (got - hf_logits(hf, IDS)).abs().max() < 1e-4


def test_bfloat16_load(tmp_path):
    hf = save_tiny_hf(str(tmp_path), "llama")
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    got = loaded.model.logits(torch.tensor(IDS)).float()
    assert (got - hf_logits(hf, IDS)).abs().max() < 0.1


def test_missing_config(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    save_tiny_hf(str(tmp_path), "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="unsupported model_type 'falcon'"):
        load_model(str(tmp_path))


def test_missing_tensor_and_shape_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_hf(str(tmp_path), "llama")
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*missing"):
        load_model(str(tmp_path))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"up_proj\.weight.*shape \(7, 64\) does not match the config's \(128, 64\)"):
        load_model(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    save_tiny_hf(str(tmp_path), "llama")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_model(str(tmp_path))
