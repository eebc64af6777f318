"""`loom info` on the default model."""

from __future__ import annotations

import json

from tests.cli.helpers import run


def test_info(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == 134_515_008
    assert info["kv_bytes_per_token"]["fp32"] == 30 * 3 * 64 * 2 * 4
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    code, out, _ = run(capsys, "info")
    assert "GiB" in out and "KV per token" in out


def test_info_on_classic_layouts(capsys, tmp_path):
    """GPT-2 / OPT / BLOOM folders: the parameter count is transformers' and the layout's specifics are named."""
    from tests.helpers import save_tiny_hf

    hf = save_tiny_hf(str(tmp_path / "opt"), "opt", ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)
    code, out, _ = run(capsys, "info", str(tmp_path / "opt"), "--json")
    assert code == 0 and json.loads(out)["parameters"] == sum(p.numel() for p in hf.parameters())
    code, out, _ = run(capsys, "info", str(tmp_path / "opt"))
    assert "(table rows p + 2)" in out and "post-norm, no final norm" in out and "embedding width 32" in out
    save_tiny_hf(str(tmp_path / "bloom"), "bloom")
    code, out, _ = run(capsys, "info", str(tmp_path / "bloom"))
    assert code == 0 and "positions     alibi" in out and "embedding normed" in out


def test_info_counts_an_moe_models_active_parameters(capsys, tmp_path):
    from tests.helpers import save_tiny_moe

    hf = save_tiny_moe(str(tmp_path), "mixtral")
    code, out, _ = run(capsys, "info", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == sum(p.numel() for p in hf.parameters())
    expert = 3 * 64 * 128  # two of the four experts of each of the 2 layers are not run by a token
    assert info["parameters"] - info["active_parameters"] == 2 * 2 * expert
    assert "2 per token" in run(capsys, "info", str(tmp_path))[1]


def test_info_on_gemma(capsys, tmp_path):
    """A Gemma 3 folder: the parameter count is transformers' and its extras (QK-norm, scaled embedding,
    local layers with their own RoPE base) are named."""
    from tests.helpers import save_tiny_hf

    hf = save_tiny_hf(str(tmp_path), "gemma3_text", head_dim=32, num_key_value_heads=2, sliding_window=8,
                      num_hidden_layers=6)
    code, out, _ = run(capsys, "info", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["parameters"] == sum(p.numel() for p in hf.parameters())
    code, out, _ = run(capsys, "info", str(tmp_path))
    assert "sandwich-norm" in out and "QK-norm per head" in out and "embedding x 8" in out
    assert "sliding window 8 on 5 of 6 layers, RoPE theta 10000" in out


def test_info_reports_a_latent_attention_cache_next_to_its_mha_equivalent(capsys, tmp_path):
    from tests.helpers import save_tiny_deepseek

    hf = save_tiny_deepseek(str(tmp_path), "deepseek_v2")
    code, out, _ = run(capsys, "info", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["kv_bytes_per_token"]["bf16"] == 3 * (16 + 4) * 2  # layers x (kv_lora_rank + qk_rope_head_dim)
    assert info["mha_kv_bytes_per_token"]["bf16"] == 3 * 4 * (8 + 4 + 12) * 2  # layers x heads x (k + v)
    code, out, _ = run(capsys, "info", str(tmp_path))
    assert "latent attention: kv_lora_rank 16, q_lora_rank 24" in out and "int8 288 B (4.8x)" in out
