"""Builders for tiny random models saved the way real checkpoints are."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512)


def save_tiny_hf(folder: str, model_type: str = "llama", seed: int = 0, shards: int = 1, **overrides: Any):
    """Random HF model of ``model_type`` saved as safetensors (optionally sharded); returns it (fp32, eval)."""
    import transformers

    kwargs = dict(TINY)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initializes biases and norms trivially; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    size = None
    if shards > 1:
        total = sum(p.numel() * 4 for p in model.parameters())
        size = f"{max(1, total // shards // 1000)}KB"
    model.save_pretrained(folder, max_shard_size=size) if size else model.save_pretrained(folder)
    return model


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_writer(path: str, arch: str, cfg, theta: float | None = None):  # type: ignore[no-untyped-def]
    """A GGUFWriter for ``arch`` holding the llama.cpp keys every decoder file has, read from the HF config
    ``cfg`` (``theta``: the RoPE base, by default the config's)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_rope_freq_base(theta)
    return w


def add_gguf_tensor(w, name: str, arr: np.ndarray, qtype) -> None:  # type: ignore[no-untyped-def]
    """Add ``arr`` to GGUFWriter ``w``: matrices (and stacked experts) in ``qtype`` (F16 as numpy half, other
    types quantized by the gguf package), vectors and F32 as fp32."""
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim >= 2 and qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    elif arr.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32:
        data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    else:
        w.add_tensor(name, arr)


def write_llama_gguf(path: str, hf_model, qtype: str = "F32", tokenizer_meta: dict | None = None,
                     drop: tuple[str, ...] = (), arch: str = "llama", extra_tensors: dict | None = None) -> None:
    """Write an HF llama model as a llama.cpp-style GGUF (permuted Q/K, GGUF tensor names)."""
    import gguf

    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w = gguf_writer(path, arch, cfg)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    for k, v in (tokenizer_meta or {}).items():
        getattr(w, k)(v)
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, arr: np.ndarray) -> None:
        if name not in drop:
            add_gguf_tensor(w, name, arr, q)

    permute = arch == "llama"
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qw, kw = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if permute:
            qw, kw = permute_for_gguf(qw, cfg.num_attention_heads), permute_for_gguf(kw, cfg.num_key_value_heads)
        add(f"blk.{i}.attn_q.weight", qw)
        add(f"blk.{i}.attn_k.weight", kw)
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for x in "qkv":
            if p + f"self_attn.{x}_proj.bias" in sd:
                b = sd[p + f"self_attn.{x}_proj.bias"]
                if permute and x in "qk":
                    b = permute_for_gguf(b, cfg.num_attention_heads if x == "q" else cfg.num_key_value_heads)
                add(f"blk.{i}.attn_{x}.bias", b)
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_level_metadata() -> dict:
    """A minimal gpt2-style tokenizer as GGUF metadata: the 256 byte tokens, no merges, eos = 1."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 256,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}


def byte_level_vocab_meta() -> dict:
    """The same tokenizer as GGUFWriter calls."""
    m = byte_level_metadata()
    return {"add_tokenizer_model": "gpt2", "add_token_list": m["tokenizer.ggml.tokens"],
            "add_token_types": m["tokenizer.ggml.token_type"], "add_token_merges": [], "add_bos_token_id": 0,
            "add_eos_token_id": 1}


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def tmp_file(folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


K_SCALE_OFFSETS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_k_quant(qtype: str, n_blocks: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Random K-quant blocks [n_blocks, bytes]: random bits everywhere, fp16 super-block scales in
    [-scale, scale] so the values stay finite (gguf-py cannot quantize K-quants, only read them)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    _, nbytes = GGML_QUANT_SIZES[getattr(GGMLQuantizationType, qtype)]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for off in K_SCALE_OFFSETS[qtype]:
        d = rng.uniform(-scale, scale, size=n_blocks).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw


def random_quantized_tensor(n: int, k: int, bits: int, group: int, seed: int = 0):
    """A QuantizedTensor of random codes, scales and offsets (w = q * s + o per group)."""
    from loom.layers.quantized import QuantizedTensor

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offsets = torch.randn(n, k // group, generator=g) * 0.05
    return QuantizedTensor(codes, scales, offsets, bits, group)


def tiny_llama_gguf(folder) -> str:
    """A tiny random Llama saved with transformers (GQA, 2 KV heads), written as an F32 GGUF with a byte-level
    vocabulary under ``folder``; returns the file's path."""
    hf = save_tiny_hf(str(folder / "hf"), "llama", num_key_value_heads=2)
    path = str(folder / "tiny.gguf")
    write_llama_gguf(path, hf, "F32", tokenizer_meta=byte_level_vocab_meta())
    return path


def peft_adapter(base, folder, seed: int = 0, **options):
    """A PEFT LoRA adapter on ``base`` with random A and B (PEFT starts B at zero: no change to test), saved
    with PEFT's own save_pretrained; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} | options))
    model = get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(folder))
    return model


def tiny_llama_folder(folder: str, seed: int = 0) -> str:
    """A tiny random Llama (GQA: 4 heads, 2 KV heads) saved by transformers with a byte-level tokenizer; the folder."""
    from loom.tokenizer import tokenizer_from_gguf_metadata

    save_tiny_hf(folder, num_key_value_heads=2, seed=seed)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(folder)
    return folder


def tiny_base_with_adapters(root, adapters: dict[str, tuple[Any, int]]) -> dict[str, str]:
    """A tiny Llama (GQA) with a byte-level tokenizer in ``root/base``, and one PEFT LoRA adapter per entry of
    ``adapters`` (name -> (target modules, rank); alpha 2r, random A and B, saved by PEFT itself) under
    ``root/<name>``; returns the folders by name ("base" for the model)."""
    from loom.tokenizer import tokenizer_from_gguf_metadata

    paths = {"base": str(root / "base")}
    save_tiny_hf(paths["base"], num_key_value_heads=2)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(paths["base"])
    for i, (name, (targets, r)) in enumerate(adapters.items()):
        hf = save_tiny_hf(str(root / f"hf-{name}"), num_key_value_heads=2)
        paths[name] = str(root / name)
        peft_adapter(hf, paths[name], seed=i, r=r, lora_alpha=2 * r, target_modules=targets)
    return paths


# Tiny MoE models per model type: top-2 of 4 experts (the shared expert and the expert sizes as each type names them).
TINY_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_key_value_heads=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_key_value_heads=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
}


def save_tiny_moe(folder: str, model_type: str, seed: int = 0, router_std: float = 1.0, shards: int = 1,
                  **overrides: Any):
    """``save_tiny_hf`` for an MoE type with ``TINY_MOE``'s experts (``overrides`` win), its routers drawn with
    ``router_std`` so that routing depends on the token (HF's 0.02 makes every router nearly uniform)."""
    model = save_tiny_hf(folder, model_type, seed, shards, **(TINY_MOE[model_type] | overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # the router (Mixtral's block_sparse_moe.gate, loaded as mlp.gate)
                p.copy_(torch.randn(p.shape, generator=gen) * router_std)
    for name in os.listdir(folder):  # saved again, sharded as before
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")):
            os.remove(os.path.join(folder, name))
    size = f"{max(1, sum(p.numel() * 4 for p in model.parameters()) // shards // 1000)}KB" if shards > 1 else None
    model.save_pretrained(folder, max_shard_size=size) if size else model.save_pretrained(folder)
    return model


# Tiny DeepSeek models (latent attention, layers/mla.py): 3 layers, the first dense, then top-3 of 8 routed experts
# and 2 shared ones; q_lora_rank and the router options per test (deepseek_v3 routes in 4 groups, the best 2 kept).
TINY_DEEPSEEK = dict(num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
                     v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                     moe_intermediate_size=16, first_k_dense_replace=1, rms_norm_eps=1e-5)
TINY_DEEPSEEK_V3 = dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)


def save_tiny_deepseek(folder: str, model_type: str = "deepseek_v2", seed: int = 0, router_std: float = 1.0,
                       **overrides: Any):
    """``save_tiny_hf`` for deepseek_v2 / deepseek_v3 with ``TINY_DEEPSEEK`` (``overrides`` win), its routers drawn
    with ``router_std`` so that routing depends on the token, V3's score-correction biases random (transformers
    starts them at zero), and the query and latent projections drawn with variance 1 / fan_in, so that attention
    scores are of order one (with transformers' std 0.02 every softmax is nearly uniform, and RoPE or the softmax
    scale would hardly show in the logits)."""
    options = TINY_DEEPSEEK | (TINY_DEEPSEEK_V3 if model_type == "deepseek_v3" else {}) | overrides
    model = save_tiny_hf(folder, model_type, seed, **options)
    gen = torch.Generator().manual_seed(seed + 1)
    projections = ("q_proj.weight", "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
                   "kv_b_proj.weight")
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * router_std)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith(projections):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    for name in os.listdir(folder):
        if name.startswith("model") and name.endswith(".safetensors"):
            os.remove(os.path.join(folder, name))
    model.save_pretrained(folder)
    return model
