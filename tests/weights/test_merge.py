"""`merge_lora`: base + adapter written as a dense HF folder whose logits, in transformers and in loom, equal
PEFT's on the base with the adapter."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from loom.weights.loader import load_model
from loom.weights.merge import merge_lora
from tests.helpers import save_tiny_hf
from tests.weights.test_lora import IDS, peft_adapter, peft_logits


def test_a_merged_folder_equals_peft_in_transformers_and_in_loom(tmp_path):
    base = save_tiny_hf(str(tmp_path / "base"))
    peft = peft_adapter(base, tmp_path / "adapter", seed=5)
    merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", with_tokenizer=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    reference = peft_logits(peft)
    torch.testing.assert_close(peft_logits(hf), reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours = load_model(str(tmp_path / "merged"), weights="fp32").model.logits(torch.tensor(IDS))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
