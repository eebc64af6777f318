"""Quantized checkpoints save and load bit for bit, dense or native, with HF tensor names."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from loom.compress.quantize.methods import QuantizeRecipe, quantize
from loom.compress.quantize.rtn import QuantConfig
from loom.layers.quantized import QuantizedLinear, W8A8Linear
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint
from tests.helpers import save_tiny_hf


def _linears(model):
    for i, layer in enumerate(model.layers):
        for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            yield f"{i}.{name}", layer.get_submodule(name)


@pytest.mark.parametrize("model_type,bits,group", [("llama", 4, 32), ("qwen2", 3, 64), ("llama", 8, 0)])
def test_round_trip_is_exact(tmp_path, model_type, bits, group):
    src = str(tmp_path / "src")
    save_tiny_hf(src, model_type, hidden_size=64, intermediate_size=128, num_key_value_heads=2)
    model = load_model(src).model
    quantize(model, QuantizeRecipe("rtn", QuantConfig(bits, group), backend="reference"))
    out = str(tmp_path / "q")
    save_checkpoint(model, out, {"method": "rtn", "bits": bits, "group_size": group, "symmetric": False})
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "loom"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.k_proj.qweight" in names and "model.layers.0.mlp.up_proj.scales" in names
    back = load_model(out, weights="native").model
    for (name, a), (_, b) in zip(_linears(model), _linears(back)):
        assert isinstance(b, QuantizedLinear), name
        qa, qb = a.quantized(), b.quantized()
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales) and \
            torch.equal(qa.offsets, qb.offsets), name
        assert (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.allclose(model.logits(ids), back.logits(ids), atol=1e-5)
    dense = load_model(out, weights="fp32").model
    for (name, a), (_, b) in zip(_linears(model), _linears(dense)):
        assert torch.equal(b.weight, a.dequantized_weight()), name


def test_w8a8_round_trip(tmp_path):
    src = str(tmp_path / "src")
    save_tiny_hf(src, "llama", hidden_size=64, intermediate_size=128)
    model = load_model(src).model
    for name, module in list(_linears(model)):
        i, sub = name.split(".", 1)
        model.replace_module(f"layers.{i}.{sub}", W8A8Linear(module.weight, module.bias))
    out = str(tmp_path / "q")
    save_checkpoint(model, out, {"method": "smoothquant", "bits": 8, "activations": 8})
    back = load_model(out, weights="native").model
    for (name, a), (_, b) in zip(_linears(model), _linears(back)):
        assert isinstance(b, W8A8Linear) and torch.equal(a.weight_int8, b.weight_int8), name
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(model.logits(ids), back.logits(ids))


def test_foreign_quantization_is_refused(tmp_path):
    src = str(tmp_path / "src")
    save_tiny_hf(src, "llama")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(Exception, match="unsupported quantization 'gptq'"):
        load_model(src)
