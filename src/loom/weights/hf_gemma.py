"""Gemma 3 checkpoints (``model_type`` gemma3_text): config.json -> ModelConfig and the tensor layout.

Gemma 3 (Gemma Team 2503.19786) is a pre-norm decoder with four choices of its own, all ModelConfig fields:

    h_0 = embed(tokens) x sqrt(hidden)                                  embedding_scale
    h = h + norm'(attn(norm(h))),  h = h + norm'(mlp(norm(h)))          norm_placement "sandwich"
    q, k = RMSNorm(q_head), RMSNorm(k_head) before RoPE                 qk_norm
    softmax scale query_pre_attn_scalar^-1/2                            attn_scale

five sliding-window (local) layers to one global layer, the local ones with their own RoPE base
(``rope_local_theta``), and a GELU-tanh gated MLP. Its RMSNorms multiply by (1 + w): the stored w gets
its 1 added as it is read (in fp32, as transformers adds it), so loom's RMSNorm runs unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from loom.config import MAX_CONTEXT, ModelConfig, scaled_context
from loom.weights.errors import WeightsError
from loom.weights.hf import (HFFamily, _ACTIVATIONS, _head_dim, _int, _llama_sources, _object, _rope_settings,
                             register_family)
from loom.weights.validate import MAX_LAYERS, MAX_ROPE_BASE, check_scaled_context, checked_number, show

GEMMA_TYPES = ("gemma3_text",)
SLIDING_PATTERN = 6  # Gemma 3's default: every sixth layer is global


def _layer_types(cfg: dict[str, Any], n_layers: int, path: str) -> tuple[bool, ...]:
    """Which layers slide: ``layer_types``, else every layer but each ``sliding_window_pattern``-th."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or \
                not all(t in ("sliding_attention", "full_attention") for t in types):
            raise WeightsError(path, f"layer_types is {show(types)}; expected {n_layers} entries of "
                                     "'sliding_attention' or 'full_attention'")
        return tuple(t == "sliding_attention" for t in types)
    pattern = _int(cfg, "sliding_window_pattern", path, SLIDING_PATTERN)
    return tuple((i + 1) % pattern != 0 for i in range(n_layers))


def _rope_bases(cfg: dict[str, Any], max_pos: int, path: str) -> tuple[float, Any, float]:
    """(global theta, global scaling, local theta) from transformers 5's per-layer-type ``rope_parameters``
    or the older ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` keys."""
    params = _object(cfg, "rope_parameters", path)
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        if not isinstance(full, dict) or not isinstance(local, dict):
            raise WeightsError(path, "rope_parameters.full_attention / sliding_attention must be objects")
        if local.get("rope_type", "default") != "default":
            raise WeightsError(path, f"rope_parameters.sliding_attention.rope_type {show(local.get('rope_type'))} "
                                     "is not supported (the local layers' RoPE is unscaled)")
        theta, scaling = _rope_settings({"rope_parameters": full}, max_pos, path)
        local_theta = local.get("rope_theta", 10000.0)
    else:
        theta, scaling = _rope_settings(cfg, max_pos, path)
        local_theta = cfg.get("rope_local_base_freq", 10000.0)
    return theta, scaling, checked_number(local_theta, "rope_local_base_freq", path, above=1, high=MAX_ROPE_BASE)


def _gemma_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    if cfg.get("model_type") == "gemma3":
        raise WeightsError(path, "a multimodal Gemma 3 checkpoint (model_type gemma3); loom runs the text-only "
                                 "gemma3_text models (e.g. gemma-3-270m, or a GGUF of the language model)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise WeightsError(path, f"{key} = {show(cfg[key])} is not supported (Gemma 2's logit soft-capping; "
                                     "Gemma 3 has none)")
    if cfg.get("use_bidirectional_attention"):
        raise WeightsError(path, "use_bidirectional_attention is not supported (an encoder-style Gemma)")
    hidden, n_heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    n_layers = _int(cfg, "num_hidden_layers", path, high=MAX_LAYERS)
    max_pos = _int(cfg, "max_position_embeddings", path, 32768, high=MAX_CONTEXT)
    theta, scaling, local_theta = _rope_bases(cfg, max_pos, path)
    max_pos, scaling = scaled_context(max_pos, scaling)
    check_scaled_context(max_pos, "the rope scaling factor", path)
    head_dim = _head_dim(cfg, hidden, n_heads, path)
    act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
    if not isinstance(act, str) or _ACTIVATIONS.get(act) != "gelu_tanh":
        raise WeightsError(path, f"hidden_activation {show(act)} is not supported for Gemma 3 (gelu_pytorch_tanh)")
    scalar = checked_number(cfg.get("query_pre_attn_scalar", head_dim), "query_pre_attn_scalar", path, above=0)
    window = _int(cfg, "sliding_window", path, None, low=0) or None
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=_int(cfg, "vocab_size", path), hidden_size=hidden, num_layers=n_layers, num_heads=n_heads,
        num_kv_heads=_int(cfg, "num_key_value_heads", path, n_heads), head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size", path), activation="gelu_tanh", gated_mlp=True,
        norm="rmsnorm", norm_eps=checked_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", path, low=0),
        norm_placement="sandwich", rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        max_position_embeddings=max_pos, qkv_bias=bool(cfg.get("attention_bias", False)),
        attn_out_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), embedding_scale=math.sqrt(hidden),
        qk_norm=True, attn_scale=scalar ** -0.5, sliding_window=window,
        sliding_window_layers=_layer_types(cfg, n_layers, path) if window else None,
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, architecture="gemma3",
        name=str(cfg.get("_name_or_path", "")),
    )


def _gemma_sources(config: ModelConfig) -> dict[str, list[str]]:
    """Llama's layout, but Gemma's post_attention_layernorm is the attention's sandwich norm: the MLP's input
    norm is pre_feedforward_layernorm, and the q / k and post-MLP norms are added."""
    src = _llama_sources(config)
    for i in range(config.num_layers):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        src[p + "post_attn_norm.weight"] = [h + "post_attention_layernorm.weight"]
        src[p + "mlp_norm.weight"] = [h + "pre_feedforward_layernorm.weight"]
        src[p + "post_mlp_norm.weight"] = [h + "post_feedforward_layernorm.weight"]
        src[p + "attn.q_norm.weight"] = [h + "self_attn.q_norm.weight"]
        src[p + "attn.k_norm.weight"] = [h + "self_attn.k_norm.weight"]
    return src


def _gemma_norm_offset(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm scales by (1 + w): add the 1 to every stored norm weight."""
    return t + 1.0 if name.endswith("norm.weight") else t


# "gemma3" is the architecture name loom gives these models (and GGUF's): it finds this family too
register_family(GEMMA_TYPES + ("gemma3",), HFFamily(_gemma_config, _gemma_sources, transform=_gemma_norm_offset))
