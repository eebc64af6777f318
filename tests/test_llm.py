"""The public API on a Hugging Face folder (tokenizer.json + safetensors), and the default model."""

from __future__ import annotations

import shutil

import torch

from loom import LLM, SamplingParams
from tests.helpers import hf_logits, save_tiny_hf


def test_llm_from_hf_folder(tmp_path, smollm_hf_dir):
    hf = save_tiny_hf(str(tmp_path), "llama", vocab_size=49152, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{smollm_hf_dir}/{name}", tmp_path / name)
    llm = LLM(str(tmp_path))
    ids = llm.encode("Hello there")
    assert ids == llm.tokenizer.encode("Hello there") and len(ids) == 2
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    # Greedy by hand with HF on the same weights.
    seq = list(ids)
    for _ in range(6):
        seq.append(int(hf_logits(hf, seq)[-1].argmax()))
    assert out.token_ids == seq[len(ids):]
    assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>")


def test_default_model_loads(smollm):
    assert smollm.config.num_layers == 30 and smollm.config.num_kv_heads == 3
    assert smollm.model.embed_tokens.weight.dtype == torch.float32
    assert smollm.load_seconds > 0
