"""GPT-2, OPT and BLOOM Hugging Face checkpoints (weights/hf_classic.py): logits equal transformers' on tiny
random checkpoints that transformers itself saved (Conv1D weights transposed, BLOOM's per-head q|k|v
interleave undone, OPT's position offset and embedding projections, ALiBi with any head count), also
from bare base-model checkpoints as the original uploads are; options loom does not compute are refused
naming config.json and the key."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.config import ModelConfig
from loom.layers.position import alibi_slopes
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.hf import config_from_hf, hf_tensor_sources
from loom.weights.loader import load_model
from loom.weights.validate import parameter_part_shapes
from tests.helpers import hf_logits, save_tiny_hf

IDS = list(range(3, 240, 7))  # 34 tokens

CASES = {
    "gpt2": ("gpt2", dict()),
    "gpt2-untied-relu-inner": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu", n_inner=96)),
    "opt-pre-norm": ("opt", dict(ffn_dim=128)),
    "opt-350m-post-norm-projected": ("opt", dict(ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)),
    "opt-no-bias-untied": ("opt", dict(ffn_dim=128, enable_bias=False, tie_word_embeddings=False)),
    "bloom": ("bloom", dict()),
    # ALiBi for head counts not a power of two (num_attention_heads: the helper's TINY spells it so)
    "bloom-6-heads": ("bloom", dict(num_attention_heads=6, hidden_size=72)),
    "bloom-12-heads": ("bloom", dict(num_attention_heads=12, hidden_size=96)),
}


def close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> bool:
    """Max abs difference within ``tol`` of the logits' scale."""
    return float((got.float() - ref).abs().max()) <= tol * float(ref.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = save_tiny_hf(str(tmp_path), model_type, **overrides)
    loaded = load_model(str(tmp_path))
    assert loaded.format == "hf" and loaded.config.architecture == model_type
    assert loaded.config.num_heads == hf.config.num_attention_heads == overrides.get("num_attention_heads", 4)
    assert loaded.config.num_parameters() == sum(p.numel() for p in hf.parameters())
    ref = hf_logits(hf, IDS)
    assert close(loaded.model.logits(torch.tensor(IDS)), ref)


def test_the_layouts_matter(tmp_path):
    """The parity above is not vacuous: OPT without its position offset, or BLOOM's q|k|v rows left as
    stored, give other logits."""
    hf = save_tiny_hf(str(tmp_path / "opt"), "opt", ffn_dim=128)
    opt = load_model(str(tmp_path / "opt")).model
    opt.config.position_offset = 0
    assert not close(opt.logits(torch.tensor(IDS)), hf_logits(hf, IDS), 1e-2)

    hf = save_tiny_hf(str(tmp_path / "bloom"), "bloom")
    bloom = load_model(str(tmp_path / "bloom")).model
    stored = load_file(str(tmp_path / "bloom" / "model.safetensors"))
    bloom.layers[0].attn.qkv_proj.weight.data = stored["transformer.h.0.self_attention.query_key_value.weight"]
    assert not close(bloom.logits(torch.tensor(IDS)), hf_logits(hf, IDS), 1e-2)


@pytest.mark.parametrize("heads", list(range(1, 41)))
def test_alibi_slopes_are_blooms(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    assert torch.allclose(alibi_slopes(heads).float(), _get_alibi_slopes(heads, torch.device("cpu")), rtol=1e-6)


@pytest.mark.parametrize("model_type,overrides,base", [
    ("gpt2", dict(), "transformer"), ("opt", dict(ffn_dim=128), "model"),
    ("bloom", dict(num_attention_heads=6, hidden_size=72), "transformer")])
def test_bare_base_model_checkpoints(tmp_path, model_type, overrides, base):
    """openai-community/gpt2, facebook/opt-* and bigscience/bloom-* store the base model's tensors without the
    causal LM's prefix (h.0.attn.c_attn.weight, decoder.layers.0..., word_embeddings.weight)."""
    hf = save_tiny_hf(str(tmp_path / "full"), model_type, **overrides)
    getattr(hf, base).save_pretrained(str(tmp_path / "bare"))
    names = load_file(str(tmp_path / "bare" / "model.safetensors"))
    assert not any(n.startswith(base + ".") for n in names)
    loaded = load_model(str(tmp_path / "bare"))
    assert close(loaded.model.logits(torch.tensor(IDS)), hf_logits(hf, IDS))


def test_sharded_gpt2(tmp_path):
    hf = save_tiny_hf(str(tmp_path), "gpt2", shards=3)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert close(load_model(str(tmp_path)).model.logits(torch.tensor(IDS)), hf_logits(hf, IDS))


@pytest.mark.parametrize("case", ["gpt2", "opt-350m-post-norm-projected", "bloom-6-heads"])
def test_bfloat16_load(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = save_tiny_hf(str(tmp_path), model_type, **overrides)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = hf_logits(hf, IDS)
    assert close(loaded.model.logits(torch.tensor(IDS)), ref, 0.05)


def _edit_config(folder, **changes) -> str:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.mark.parametrize("model_type,overrides,key,value", [
    ("gpt2", dict(), "scale_attn_by_inverse_layer_idx", True),
    ("gpt2", dict(), "scale_attn_weights", False),
    ("gpt2", dict(), "activation_function", "tanh"),
    ("opt", dict(ffn_dim=128), "layer_norm_elementwise_affine", False),
    ("opt", dict(ffn_dim=128), "activation_function", "quick_gelu"),
    ("bloom", dict(), "apply_residual_connection_post_layernorm", True),
])
def test_options_loom_does_not_compute_are_refused(tmp_path, model_type, overrides, key, value):
    save_tiny_hf(str(tmp_path), model_type, **overrides)
    path = _edit_config(tmp_path, **{key: value})
    with pytest.raises(WeightsError) as e:
        load_model(str(tmp_path))
    assert path in str(e.value) and key in str(e.value)


def test_accepted_options_that_keep_the_arithmetic(tmp_path):
    """reorder_and_upcast_attn (fp32 q k^T, which loom's fp32 model computes anyway) and BLOOM's
    pretraining_tp (bigscience/bloom says 4) load and match. (transformers' slow_but_exact path, which
    slices the dense sums by pretraining_tp, also drops the dense biases: loom keeps them.)"""
    hf = save_tiny_hf(str(tmp_path / "gpt2"), "gpt2", reorder_and_upcast_attn=True)
    assert close(load_model(str(tmp_path / "gpt2")).model.logits(torch.tensor(IDS)), hf_logits(hf, IDS))
    hf = save_tiny_hf(str(tmp_path / "bloom"), "bloom", pretraining_tp=4)
    assert close(load_model(str(tmp_path / "bloom")).model.logits(torch.tensor(IDS)), hf_logits(hf, IDS))


def test_layer_count_and_shape_mismatches_name_the_key_and_tensor(tmp_path):
    save_tiny_hf(str(tmp_path), "gpt2")
    path = _edit_config(tmp_path, n_layer=3)
    with pytest.raises(WeightsError, match=r"n_layer is 3, but the file holds tensors for 2 layers"):
        load_model(str(tmp_path))
    _edit_config(tmp_path, n_layer=2)
    weights = str(tmp_path / "model.safetensors")
    tensors = load_file(weights)
    name = "transformer.h.1.attn.c_attn.weight"
    tensors[name] = tensors[name][:, :-4].contiguous()  # stored [in, out]: 4 output columns short
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"shape \(188, 64\) does not match the config's \(192, 64\)") as e:
        load_model(str(tmp_path))
    assert e.value.tensor == name and path.rpartition("/")[0] in str(e.value)


def test_bloom_fused_qkv_of_the_wrong_size_is_named(tmp_path):
    save_tiny_hf(str(tmp_path), "bloom")
    weights = str(tmp_path / "model.safetensors")
    tensors = load_file(weights)
    name = "transformer.h.0.self_attention.query_key_value.bias"
    tensors[name] = tensors[name][:-3].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"shape \(189,\) does not match the config's \(192,\)") as e:
        load_model(str(tmp_path))
    assert e.value.tensor == name


@pytest.mark.parametrize("case", list(CASES))
def test_the_expected_shapes_are_the_models(case):
    """Every parameter has a source, and the shapes files are checked against are the model's own."""
    import transformers

    model_type, overrides = CASES[case]
    kwargs = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    hf_config = transformers.AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    cfg = config_from_hf(hf_config.to_dict())
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())
    sources = hf_tensor_sources(cfg, None)
    assert set(sources) == set(params)
    for name, param in params.items():
        parts = parameter_part_shapes(cfg, name)
        assert parts is not None, name
        assert sum(p[0] for p in parts) == param.shape[0] and all(p[1:] == param.shape[1:] for p in parts), name


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match="position_offset needs learned positions"):
        ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, position_offset=2)
    with pytest.raises(ValueError, match="embedding_size must be positive"):
        ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, embedding_size=0)
    cfg = ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2)
    assert (cfg.position_offset, cfg.embedding_norm, cfg.embedding_size) == (0, False, 8)


@pytest.mark.parametrize("case", ["opt-350m-post-norm-projected", "bloom-6-heads"])
def test_lora_adapters_merge_as_peft_computes_them(tmp_path, case):
    """A PEFT adapter on every linear (BLOOM's fused query_key_value included: its delta is merged in the
    stored per-head layout, then re-laid-out with the weight) equals PEFT + transformers."""
    from tests.helpers import peft_adapter

    model_type, overrides = CASES[case]
    hf = save_tiny_hf(str(tmp_path / "base"), model_type, **overrides)
    peft = peft_adapter(hf, tmp_path / "adapter")
    with torch.no_grad():
        ref = peft(torch.tensor([IDS])).logits[0].float()
    merged = load_model(str(tmp_path / "base"), weights="fp32", lora=str(tmp_path / "adapter")).model
    assert close(merged.logits(torch.tensor(IDS)), ref)
    assert not close(load_model(str(tmp_path / "base")).model.logits(torch.tensor(IDS)), ref, 1e-2)


def test_gpt2_conv1d_adapters_are_refused(tmp_path):
    """PEFT adapts GPT-2's Conv1D with fan_in_fan_out (B A stored transposed): refused by name."""
    from tests.helpers import peft_adapter

    hf = save_tiny_hf(str(tmp_path / "base"), "gpt2")
    peft_adapter(hf, tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(WeightsError, match="fan_in_fan_out"):
        load_model(str(tmp_path / "base"), weights="fp32", lora=str(tmp_path / "adapter"))


def test_writing_these_layouts_back_is_refused_before_any_file(tmp_path):
    """loom writes Llama-shaped HF folders only (merge, quantize, prune save through save_checkpoint): a GPT-2,
    OPT or BLOOM model is refused up front, leaving no half-written folder."""
    from loom.weights.merge import merge_lora
    from tests.helpers import peft_adapter

    hf = save_tiny_hf(str(tmp_path / "base"), "opt", ffn_dim=128)
    peft_adapter(hf, tmp_path / "adapter")
    with pytest.raises(ValueError, match="cannot write a Hugging Face config for architecture 'opt'"):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"), with_tokenizer=False)
    assert not os.path.exists(tmp_path / "merged")


HUB_CONFIGS = {  # the config.json of the original uploads (trimmed of training-only keys)
    "openai-community/gpt2": dict(
        model_type="gpt2", activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256,
        layer_norm_epsilon=1e-05, n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257),
    "facebook/opt-350m": dict(
        model_type="opt", activation_function="relu", bos_token_id=2, do_layer_norm_before=False, eos_token_id=2,
        ffn_dim=4096, hidden_size=1024, max_position_embeddings=2048, num_attention_heads=16, num_hidden_layers=24,
        pad_token_id=1, vocab_size=50272, word_embed_proj_dim=512),
    "facebook/opt-125m": dict(
        model_type="opt", activation_function="relu", bos_token_id=2, do_layer_norm_before=True, eos_token_id=2,
        ffn_dim=3072, hidden_size=768, max_position_embeddings=2048, num_attention_heads=12, num_hidden_layers=12,
        pad_token_id=1, vocab_size=50272, word_embed_proj_dim=768),
    "bigscience/bloom-560m": dict(
        model_type="bloom", apply_residual_connection_post_layernorm=False, bos_token_id=1, eos_token_id=2,
        layer_norm_epsilon=1e-05, n_embed=1024, n_head=16, n_inner=None, n_layer=24, pad_token_id=3,
        pretraining_tp=1, slow_but_exact=False, vocab_size=250880),
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_configs_read_as_transformers_reads_them(name):
    """The real models' configs: loom's parameter count is transformers' model's (built on the meta device)."""
    import transformers

    cfg = config_from_hf(dict(HUB_CONFIGS[name]))
    hf_config = transformers.AutoConfig.for_model(**HUB_CONFIGS[name])
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = Transformer(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (hf_config.num_hidden_layers, hf_config.hidden_size,
                                                                 hf_config.num_attention_heads)
