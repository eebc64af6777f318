"""LoRA adapters in PEFT's format, merged as they load: logits equal PEFT + transformers on the same base
(an HF folder, a GGUF with permuted Q/K, the real SmolLM2), rsLoRA and per-module patterns scale as PEFT
scales, and malformed or foreign adapters are refused naming the file and tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from loom.weights.lora import read_lora
from tests.helpers import peft_adapter, save_tiny_hf, tiny_llama_gguf

IDS = [3, 17, 42, 7, 99, 5, 64, 12]


def peft_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def loom_logits(path, adapter, ids=IDS, weights="fp32") -> torch.Tensor:
    model = load_model(path, weights=weights, lora=str(adapter)).model
    with torch.no_grad():
        return model.logits(torch.tensor(ids)).float()


def test_an_hf_folder_with_an_adapter_equals_peft(tmp_path):
    base = save_tiny_hf(str(tmp_path / "base"))
    peft = peft_adapter(base, tmp_path / "adapter")
    merged, reference = loom_logits(tmp_path / "base", tmp_path / "adapter"), peft_logits(peft)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    with peft.disable_adapter():
        assert (peft_logits(peft) - reference).abs().max() > 1e-2  # the adapter changes the logits


@pytest.mark.parametrize("options", [{"use_rslora": True, "lora_alpha": 16, "r": 8},
                                     {"target_modules": ["q_proj", "v_proj", "down_proj"],
                                      "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}])
def test_scaling_options_scale_as_peft(tmp_path, options):
    base = save_tiny_hf(str(tmp_path / "base"))
    peft = peft_adapter(base, tmp_path / "adapter", seed=1, **options)
    torch.testing.assert_close(loom_logits(tmp_path / "base", tmp_path / "adapter"), peft_logits(peft),
                               rtol=1e-5, atol=1e-5)


def test_a_gguf_base_with_an_adapter_equals_peft_on_the_same_weights(tmp_path):
    path = tiny_llama_gguf(tmp_path)  # its HF twin is tmp_path / "hf"; Q and K are permuted in the file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    peft = peft_adapter(hf, tmp_path / "adapter", seed=2)
    torch.testing.assert_close(loom_logits(path, tmp_path / "adapter"), peft_logits(peft), rtol=1e-4, atol=1e-4)


def test_the_real_model_with_an_adapter_equals_peft(smollm_path, smollm_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from loom import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(smollm_hf_dir, dtype=torch.float32).eval()
    peft = peft_adapter(hf, tmp_path / "adapter", seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ids = list(range(100, 164))
    merged, reference = loom_logits(smollm_path, tmp_path / "adapter", ids), peft_logits(peft, ids)
    assert (merged - reference).abs().max() < 1e-3
    llm = LLM(smollm_path, lora=str(tmp_path / "adapter"))  # no weights given: dense fp32 for the merge
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    with torch.no_grad():
        expected = peft.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert out == expected


def test_native_weights_are_refused(smollm_path, tmp_path):
    base = save_tiny_hf(str(tmp_path / "base"))
    peft_adapter(base, tmp_path / "adapter")
    with pytest.raises(ValueError, match="merged into dense weights"):
        load_model(smollm_path, weights="native", lora=str(tmp_path / "adapter"))


def broken(tmp_path, change) -> str:
    """A copy of a valid adapter with ``change(config, tensors)`` applied."""
    base = save_tiny_hf(str(tmp_path / "base"))
    peft_adapter(base, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    change(config, tensors)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    return str(tmp_path / "adapter")


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("change,words", [
    (lambda c, t: t.pop(Q_B), "lora_B is missing"),
    (lambda c, t: c.update(r=8), "rank 4 but the config says r = 8"),
    (lambda c, t: t.update({Q_A: torch.zeros(4, 7)}), "B A is"),
    (lambda c, t: t.update({Q_B: torch.zeros(5, 3)}), "do not multiply"),
    (lambda c, t: c.update(use_dora=True), "DoRA"),
    (lambda c, t: c.update(peft_type="PREFIX_TUNING"), "is not LORA"),
    (lambda c, t: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda c, t: t.update({"base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight": torch.zeros(4, 64),
                            "base_model.model.model.layers.0.self_attn.zz_proj.lora_B.weight": torch.zeros(64, 4)}),
     "does not have"),
    (lambda c, t: t.update({"something.else": torch.zeros(1)}), "PEFT's naming"),
])
def test_malformed_adapters_name_the_file_and_tensor(tmp_path, change, words):
    folder = broken(tmp_path, change)
    with pytest.raises(WeightsError, match="adapter") as e:
        load_model(str(tmp_path / "base"), weights="fp32", lora=folder)
    assert words in str(e.value)


def test_a_folder_that_is_no_adapter(tmp_path):
    with pytest.raises(WeightsError, match="not a PEFT adapter folder"):
        read_lora(tmp_path)

