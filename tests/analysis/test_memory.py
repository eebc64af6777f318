"""Seed 003's memory table, seed 001's Llama-3-8B KV cache figures, seed 002's llama-2-7b KV remark."""

from __future__ import annotations

import pytest

from loom.analysis.memory import activation_elements_per_token, estimate_memory
from loom.analysis.presets import MODELS

GB, GiB = 10**9, 2**30


@pytest.mark.parametrize("dtype,load_gb,train_gb", [("fp32", 4, 24), ("fp16", 2, 12), ("int8", 1, 6)])
def test_seed003_one_billion_parameters(dtype, load_gb, train_gb):
    """Seed 003: "1B 全精度: load 4GB | train 24GB; 16位: 2 | 12; 8位: 1 | 6" (4 + 8 + 4 + 8 bytes per
    parameter at fp32 with Adam, every term scaled with the dtype)."""
    load = estimate_memory(parameters=1e9, dtype=dtype, activations="seed")
    assert load.total == load.weights == load_gb * GB
    train = estimate_memory(parameters=1e9, dtype=dtype, train=True, optimizer="adam", activations="seed")
    assert train.total == train_gb * GB
    b = load_gb  # bytes per parameter
    assert (train.weights, train.optimizer_states, train.gradients, train.activations) == \
        (b * GB, 2 * b * GB, b * GB, 2 * b * GB)


def test_seed003_16bit_training_in_practice():
    """Seed 003's 12 GB for 16-bit training keeps Adam's states in 16 bits too. Mixed-precision training
    as usually done keeps an fp32 master copy and fp32 Adam states: 2 + 2 + 4 + 8 = 16 bytes per
    parameter before activations (ZeRO's 16 psi), so 1B parameters need 16 GB + activations (20 GB with
    the seed's activation estimate), not 12."""
    est = estimate_memory(parameters=1e9, dtype="fp16", train=True, mixed_precision=True, activations="seed")
    assert est.weights + est.gradients + est.master_weights + est.optimizer_states == 16 * GB
    assert est.total == 20 * GB


def test_optimizers():
    sgd = estimate_memory(parameters=1e9, dtype="fp32", train=True, optimizer="sgd", activations="seed")
    mom = estimate_memory(parameters=1e9, dtype="fp32", train=True, optimizer="sgd-momentum", activations="seed")
    adamw = estimate_memory(parameters=1e9, dtype="fp32", train=True, optimizer="adamw", activations="seed")
    assert (sgd.optimizer_states, mom.optimizer_states, adamw.optimizer_states) == (0, 4 * GB, 8 * GB)
    assert estimate_memory(parameters=1e9, dtype="int4").weights == 0.5 * GB
    # quantized weights: KV cache and activations stay 16-bit unless the KV dtype is given
    cfg = MODELS["llama-3-8b"]
    q = estimate_memory(cfg, dtype="int4", context=8192)
    assert q.kv_cache == GiB and q.weights == cfg.num_parameters() / 2
    assert q.activations == estimate_memory(cfg, dtype="fp16", context=8192).activations
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(parameters=1e9, train=True, optimizer="lion")


def test_seed001_llama3_8b_kv_cache():
    """Seed 001: 32 layers x 8 KV groups x 128 x 16/8 x 2 = 131072 bytes per token; 8192 tokens: 1 GiB
    (the seed's "1G")."""
    cfg = MODELS["llama-3-8b"]
    assert cfg.kv_bytes_per_token(2) == 131_072
    est = estimate_memory(cfg, dtype="fp16", context=8192)
    assert est.kv_cache == GiB
    assert estimate_memory(cfg, dtype="fp16", context=8192, batch=4).kv_cache == 4 * GiB
    assert estimate_memory(cfg, dtype="fp16", kv_dtype="int8", context=8192).kv_cache == GiB / 2


def test_seed002_llama2_kv_remark_has_params_and_bytes_swapped():
    """Seed 002: "llama-2-7b: one token is 512K parameters (256KB); 32k tokens are 16B parameters (8GB)".
    A token's K and V are 32 layers x 32 heads x 128 x 2 = 262,144 = 256 Ki elements, 512 KiB in fp16;
    32,768 tokens hold 8 Gi elements = 16 GiB in fp16. The seed swapped elements and bytes."""
    cfg = MODELS["llama-2-7b"]
    elements = cfg.kv_bytes_per_token(1)
    assert elements == 256 * 2**10 != 512 * 2**10
    assert cfg.kv_bytes_per_token(2) == 512 * 2**10
    assert 32768 * elements == 8 * 2**30
    assert estimate_memory(cfg, dtype="fp16", context=32768).kv_cache == 16 * GiB


def test_analytic_activations_scale_with_tokens():
    cfg = MODELS["smollm2-135m"]
    a = estimate_memory(cfg, dtype="fp32", context=1024, batch=1, train=True).activations
    b = estimate_memory(cfg, dtype="fp32", context=1024, batch=4, train=True).activations
    c = estimate_memory(cfg, dtype="fp32", context=2048, batch=4, train=True).activations
    assert b == 4 * a and c == 2 * b
    per_token = activation_elements_per_token(cfg, train=True)
    assert a == 1024 * per_token * 4
    # inference holds one layer's working set, far less than training's saved tensors
    assert activation_elements_per_token(cfg, train=False) < per_token / cfg.num_layers
    inf = estimate_memory(cfg, dtype="fp32", context=1024)
    assert inf.total == inf.weights + inf.kv_cache + inf.activations and inf.gradients == 0


def test_latent_attention_caches_its_latents():
    """DeepSeek-V2 (2405.04434, table 1): MLA caches (d_c + d_h^R) l elements per token = 576 x 27 for V2-Lite,
    against 2 n_h d_h l for MHA (here keys of 192 and values of 128 per head: 16 x 320 x 27)."""
    cfg = MODELS["deepseek-v2-lite"]
    est = estimate_memory(cfg, dtype="bf16", context=32768)
    assert est.kv_per_token == 27 * 576 * 2 == cfg.kv_bytes_per_token(2)
    assert est.kv_per_token_mha == 27 * 16 * 320 * 2
    assert est.kv_cache == 32768 * 31104 and est.kv_cache_mha == 32768 * 276480
    assert est.to_dict()["kv_cache_mha"] == est.kv_cache_mha
    assert 15.6e9 < est.parameters < 15.8e9
    dense = estimate_memory(MODELS["llama-3-8b"], dtype="fp16", context=8192)
    assert dense.kv_cache_mha == dense.kv_cache
