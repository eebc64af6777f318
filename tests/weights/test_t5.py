"""T5 folders (weights/t5.py): config.json read as transformers reads it, checked against the tensors, and every
refusal a WeightsError naming the file and the key or tensor at fault."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.weights.errors import WeightsError
from loom.weights.t5 import is_t5_folder, load_t5, t5_config_from_hf
from tests.t5_checkpoints import VOCAB, save_tiny_t5

BASE = {"model_type": "t5", "vocab_size": 100, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2,
        "num_heads": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("t5"))
    save_tiny_t5(path, feed_forward="relu", tied=True)
    return path


def copy_of(folder: str, tmp_path, edit_config=None, edit_tensors=None) -> str:
    """The checkpoint in ``folder`` copied to tmp_path, its config.json and tensors edited in place."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    if edit_config:
        edit_config(cfg)
    if edit_tensors:
        edit_tensors(tensors)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return str(tmp_path)


@pytest.mark.parametrize("proj,activation,gated", [("relu", "relu", False), ("gated-gelu", "gelu_tanh", True),
                                                   ("gelu", "gelu", False), ("gated-silu", "silu", True),
                                                   ("gelu_new", "gelu_tanh", False)])
def test_feed_forward_proj(proj, activation, gated):
    c = t5_config_from_hf({**BASE, "feed_forward_proj": proj})
    assert (c.activation, c.gated_mlp) == (activation, gated)


def test_defaults_and_the_output_scale():
    c = t5_config_from_hf(BASE)
    assert (c.num_encoder_layers, c.num_decoder_layers, c.relative_attention_num_buckets) == (2, 2, 32)
    assert (c.decoder_start_token_id, c.pad_token_id, c.eos_token_ids, c.max_position_embeddings) == (0, 0, (1,), 512)
    assert c.scale_decoder_outputs and c.tie_word_embeddings
    # flan-t5's config.json (transformers 4): untied, no rescaling; transformers 5 writes scale_decoder_outputs
    assert not t5_config_from_hf({**BASE, "tie_word_embeddings": False}).scale_decoder_outputs
    assert not t5_config_from_hf({**BASE, "tie_word_embeddings": True, "scale_decoder_outputs": False}
                                 ).scale_decoder_outputs
    assert not t5_config_from_hf({**BASE, "model_type": "mt5"}).scale_decoder_outputs  # mT5 never rescales
    # keys left out take transformers' defaults, which differ between T5 and mT5
    t5, mt5 = t5_config_from_hf({"model_type": "t5"}), t5_config_from_hf({"model_type": "mt5"})
    assert (t5.vocab_size, t5.d_ff, t5.num_encoder_layers, t5.num_heads, t5.gated_mlp) == (32128, 2048, 6, 8, False)
    assert (mt5.vocab_size, mt5.d_ff, mt5.num_encoder_layers, mt5.num_heads, mt5.gated_mlp) == (
        250112, 1024, 8, 6, True)
    assert not t5_config_from_hf(BASE, has_lm_head=True).tie_word_embeddings
    c = t5_config_from_hf({**BASE, "num_decoder_layers": 3, "n_positions": 64, "decoder_start_token_id": 5,
                           "eos_token_id": [1, 2]})
    assert (c.num_decoder_layers, c.max_position_embeddings, c.decoder_start_token_id, c.eos_token_ids) == (
        3, 64, 5, (1, 2))


@pytest.mark.parametrize("edit,words", [
    ({"model_type": "umt5"}, ["umt5", "relative position bias table"]),
    ({"feed_forward_proj": "gated-gelu-x"}, ["feed_forward_proj"]),
    ({"feed_forward_proj": "swiglu"}, ["feed_forward_proj", "swiglu"]),
    ({"d_model": 0}, ["d_model"]),
    ({"num_heads": None}, []),  # null: the default (8)
    ({"relative_attention_num_buckets": 2}, ["relative_attention_num_buckets"]),
    ({"decoder_start_token_id": 100}, ["decoder_start_token_id"]),
    ({"eos_token_id": "x"}, ["eos_token_id"]),
    ({"scale_decoder_outputs": "yes"}, ["scale_decoder_outputs"]),
    ({"quantization_config": {"load_in_8bit": True}}, ["quantization_config"]),
])
def test_bad_configs_are_refused_by_key(edit, words):
    cfg = {**BASE, **edit}
    if not words:
        assert t5_config_from_hf(cfg, "x/config.json").num_heads == 8
        return
    with pytest.raises(WeightsError) as e:
        t5_config_from_hf(cfg, "x/config.json")
    assert "x/config.json" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_routing():
    assert not is_t5_folder("/nonexistent")


def test_umt5_folder_is_refused_by_name(folder, tmp_path):
    path = copy_of(folder, tmp_path, lambda c: c.update(model_type="umt5"))
    assert is_t5_folder(path)
    with pytest.raises(WeightsError, match="umt5"):
        load_t5(path)


def test_missing_tensor_is_named(folder, tmp_path):
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    path = copy_of(folder, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(WeightsError) as e:
        load_t5(path)
    assert name in str(e.value) and path in str(e.value)


def test_wrong_shape_is_named(folder, tmp_path):
    name = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    path = copy_of(folder, tmp_path, edit_tensors=lambda t: t.update({name: torch.zeros(7, 32)}))
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        load_t5(path)


def test_layer_count_must_match_the_blocks(folder, tmp_path):
    path = copy_of(folder, tmp_path, lambda c: c.update(num_decoder_layers=3))
    with pytest.raises(WeightsError, match="num_decoder_layers is 3"):
        load_t5(path)


def test_per_layer_relative_tables_are_refused(folder, tmp_path):
    name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    path = copy_of(folder, tmp_path, edit_tensors=lambda t: t.update({name: torch.zeros(8, 4)}))
    with pytest.raises(WeightsError, match="per-layer"):
        load_t5(path)


def test_old_files_unused_cross_attention_table_is_ignored(folder, tmp_path):
    name = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    path = copy_of(folder, tmp_path, edit_tensors=lambda t: t.update({name: torch.zeros(8, 4)}))
    assert load_t5(path).config.num_decoder_layers == 2


def test_embedding_under_the_stacks_name_and_pytorch_bin(folder, tmp_path):
    """A checkpoint keeping the embedding only as encoder.embed_tokens.weight, stored as pytorch_model.bin."""
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with open(os.path.join(folder, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    got = load_t5(str(tmp_path)).model
    want = load_t5(folder).model
    ids = torch.arange(10) % VOCAB
    assert torch.equal(got.logits(ids, ids[:4]), want.logits(ids, ids[:4]))
