"""MoE GGUF files in llama.cpp's layout (experts stacked per projection: blk.N.ffn_{gate,up,down}_exps [E, rows,
cols], the router ffn_gate_inp; Qwen2-MoE's shared expert ffn_*_shexp and its gate ffn_gate_inp_shexp), written
here with gguf's GGUFWriter from a model transformers saved: they load and give the HF model's logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from tests.helpers import add_gguf_tensor, gguf_writer, hf_logits, permute_for_gguf, save_tiny_moe

IDS = list(range(3, 240, 7))


def write_moe_gguf(path: str, hf, arch: str, qtype: str = "F32", drop: tuple[str, ...] = (),
                   extra: dict | None = None, expert_count: int | None = None) -> None:
    """An HF mixtral (as llama.cpp's "llama" arch, Q/K permuted), qwen2_moe ("qwen2moe") or qwen3_moe ("qwen3moe")
    model as a GGUF
    (``expert_count``: what the metadata claims, by default the truth)."""
    import gguf

    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w = gguf_writer(path, arch, cfg)
    w.add_vocab_size(cfg.vocab_size)
    n_experts = cfg.num_local_experts if arch == "llama" else cfg.num_experts
    w.add_expert_count(expert_count or n_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    for key, value in (extra or {}).items():
        getattr(w, key)(*value) if isinstance(value, tuple) else getattr(w, key)(value)
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, arr: np.ndarray) -> None:
        if name in drop:
            return
        add_gguf_tensor(w, name, arr, q)

    permute = arch == "llama"
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        qw, kw = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if permute:
            qw, kw = permute_for_gguf(qw, cfg.num_attention_heads), permute_for_gguf(kw, cfg.num_key_value_heads)
        add(b + "attn_q.weight", qw)
        add(b + "attn_k.weight", kw)
        add(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for x in "qkv":
            if p + f"self_attn.{x}_proj.bias" in sd:
                add(b + f"attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"])
        for x in "qk":  # Qwen3-MoE's per-head norms
            if p + f"self_attn.{x}_norm.weight" in sd:
                add(b + f"attn_{x}_norm.weight", sd[p + f"self_attn.{x}_norm.weight"])
        add(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        # transformers holds experts stacked: gate_up [E, 2 f, h] (gate rows first), down [E, h, f]
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        f = gate_up.shape[1] // 2
        add(b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
        add(b + "ffn_gate_exps.weight", gate_up[:, :f])
        add(b + "ffn_up_exps.weight", gate_up[:, f:])
        add(b + "ffn_down_exps.weight", down)
        if p + "mlp.shared_expert.gate_proj.weight" in sd:
            for x in ("gate", "up", "down"):
                add(b + f"ffn_{x}_shexp.weight", sd[p + f"mlp.shared_expert.{x}_proj.weight"])
            w.add_tensor(b + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"][0])  # [hidden]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model_type,arch,qtype,tol", [
    ("mixtral", "llama", "F32", 1e-4), ("mixtral", "llama", "F16", 2e-2), ("mixtral", "llama", "Q8_0", 5e-2),
    ("qwen2_moe", "qwen2moe", "F32", 1e-4), ("qwen3_moe", "qwen3moe", "F32", 1e-4)])
def test_moe_gguf_loads_and_equals_the_hf_model(tmp_path, model_type, arch, qtype, tol):
    # Qwen3-MoE checkpoints renormalize (norm_topk_prob), as llama.cpp's qwen3moe always does
    hf = save_tiny_moe(str(tmp_path / "hf"), model_type, **({"norm_topk_prob": True} if arch == "qwen3moe" else {}))
    path = str(tmp_path / "moe.gguf")
    write_moe_gguf(path, hf, arch, qtype)
    for weights in ("fp32", "native"):  # native: expert slices are dequantized, whatever their type
        loaded = load_model(path, weights=weights)
        c = loaded.config
        assert c.num_experts == 4 and c.num_experts_per_tok == 2
        assert c.norm_topk_prob == (model_type != "qwen2_moe")  # llama.cpp's default for each architecture
        assert c.qk_norm == (arch == "qwen3moe")
        want = hf_logits(hf, IDS)
        got = loaded.model.logits(torch.tensor(IDS)).float()
        assert (got - want).abs().max() < tol * want.abs().max()


def test_expert_weights_norm_key_overrides_the_default(tmp_path):
    hf = save_tiny_moe(str(tmp_path / "hf"), "qwen2_moe", norm_topk_prob=True)
    path = str(tmp_path / "moe.gguf")
    write_moe_gguf(path, hf, "qwen2moe", extra={"add_expert_weights_norm": True})
    loaded = load_model(path, weights="fp32")
    assert loaded.config.norm_topk_prob
    assert (loaded.model.logits(torch.tensor(IDS)) - hf_logits(hf, IDS)).abs().max() < 1e-4


@pytest.mark.parametrize("change,match", [
    (dict(drop=("blk.1.ffn_up_exps.weight",)), r"tensor 'blk\.1\.ffn_up_exps\.weight'.*missing"),
    (dict(extra={"add_expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID}),
     r"expert_gating_func is 2: loom's router is a softmax"),
])
def test_broken_or_unsupported_moe_files_name_the_file_and_key(tmp_path, change, match):
    hf = save_tiny_moe(str(tmp_path / "hf"), "mixtral")
    path = str(tmp_path / "moe.gguf")
    write_moe_gguf(path, hf, "llama", **change)
    with pytest.raises(WeightsError, match=match) as info:
        load_model(path, weights="fp32")
    assert path in str(info.value)


def test_a_stack_with_fewer_experts_than_the_count_is_refused(tmp_path):
    hf = save_tiny_moe(str(tmp_path / "hf"), "mixtral")
    path = str(tmp_path / "moe.gguf")
    write_moe_gguf(path, hf, "llama", expert_count=6)  # the router and the stacks hold 4
    with pytest.raises(WeightsError, match=r"ffn_gate_inp\.weight'\): shape \(4, 64\) does not match the config's "
                                           r"\(6, 64\)"):
        load_model(path, weights="fp32")
    write_moe_gguf(path, hf, "llama", expert_count=6, drop=("blk.0.ffn_gate_inp.weight",),
                   extra={"add_tensor": ("blk.0.ffn_gate_inp.weight", np.zeros((6, 64), np.float32))})
    with pytest.raises(WeightsError, match=r"ffn_gate_exps\.weight'\): shape \(4, 128, 64\) holds no expert 4"):
        load_model(path, weights="fp32")
