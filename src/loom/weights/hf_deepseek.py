"""Hugging Face DeepSeek-V2 and DeepSeek-V3 checkpoints: latent attention (layers/mla.py) and DeepSeek's MoE.

config.json                         ModelConfig
  kv_lora_rank, q_lora_rank (null)    kv_lora_rank, q_lora_rank (0: q_proj)
  qk_nope_head_dim, qk_rope_head_dim  qk_nope_head_dim, qk_rope_head_dim (head_dim is their sum: the
  v_head_dim                          softmax scale's d; config.json's head_dim, the rope width, is ignored)
  rope_interleave                     rope_interleave (deepseek_v2: always, its RoPE is complex products of pairs)
  attention_bias                      biases of q_a_proj, kv_a_proj_with_mqa and o_proj
  n_routed_experts, num_experts_per_tok, moe_intermediate_size   the routed experts
  n_shared_experts                    one ungated shared expert of n_shared_experts x moe_intermediate_size
  first_k_dense_replace, moe_layer_freq   layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq
                                      == 0 (DeepSeek's code; transformers ignores moe_layer_freq, and every
                                      released checkpoint has 1), else a dense MLP of intermediate_size
  routed_scaling_factor               moe_routed_scale
  deepseek_v2 topk_method             "greedy" (softmax, top-k) or "group_limited_greedy" (n_group, topk_group)
  deepseek_v3                         "noaux_tc": sigmoid scores, e_score_correction_bias, n_group / topk_group,
                                      norm_topk_prob
  rope_scaling yarn + mscale / mscale_all_dim   cos/sin scaled by mscale(s, mscale) / mscale(s, mscale_all_dim)
                                      (YaRN's attention_factor), the softmax scale by mscale(s, mscale_all_dim)^2,
                                      mscale(s, m) = 0.1 m ln s + 1 (transformers' yarn_get_mscale)

Tensors are read as transformers saves them (one per expert and projection, as published):
``self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``; ``mlp.gate.weight`` (router), ``mlp.gate.e_score_correction_bias`` (V3),
``mlp.experts.E.{gate,up,down}_proj``, ``mlp.shared_experts.*``. Options loom does not implement are refused
with a WeightsError naming the file and key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from loom.config import MAX_CONTEXT, ModelConfig, scaled_context
from loom.weights.errors import WeightsError
from loom.weights.hf import _ACTIVATIONS, HFFamily, _int, _object, _rope_settings, register_family
from loom.weights.validate import MAX_LAYERS, check_scaled_context, checked_number, show

_TOPK_METHODS = {"deepseek_v2": (None, "greedy", "group_limited_greedy"), "deepseek_v3": (None, "noaux_tc")}
_SCORING = {"deepseek_v2": (None, "softmax"), "deepseek_v3": (None, "sigmoid")}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude scale 0.1 m ln(s) + 1 for s > 1, else 1 (DeepSeek's yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _bool(cfg: dict[str, Any], key: str, path: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WeightsError(path, f"{key} is {show(value)}; expected true or false")
    return value


def _rope(cfg: dict[str, Any], max_pos: int, qk_head_dim: int, path: str):  # type: ignore[no-untyped-def]
    """(theta, scaling, attn_scale) with DeepSeek's YaRN mscale / mscale_all_dim folded in: YaRN's cos/sin factor
    (unless the file names its ``attention_factor``) and the softmax scale (None: qk_head_dim^-1/2)."""
    stripped, mscales = dict(cfg), {}
    for key in ("rope_scaling", "rope_parameters"):
        params = _object(cfg, key, path)
        if params:
            mscales[key] = {k: params.get(k) for k in ("mscale", "mscale_all_dim")}
            stripped[key] = {k: v for k, v in params.items() if k not in ("mscale", "mscale_all_dim")}
    theta, scaling = _rope_settings(stripped, max_pos, path)
    if scaling is None:
        return theta, None, None
    where = "rope_scaling" if _object(cfg, "rope_scaling", path) else "rope_parameters"
    mscale, mscale_all = (checked_number(mscales.get(where, {}).get(k) or 0, f"{where}.{k}", path, low=0)
                          for k in ("mscale", "mscale_all_dim"))
    if (mscale or mscale_all) and scaling.kind != "yarn":
        raise WeightsError(path, f"{where}.mscale / mscale_all_dim are YaRN's; rope type {scaling.kind!r} does not "
                                 "take them")
    if mscale and mscale_all and scaling.attention_factor is None:
        factor = yarn_mscale(scaling.factor, mscale) / yarn_mscale(scaling.factor, mscale_all)
        scaling = dataclasses.replace(scaling, attention_factor=factor)
    attn_scale = None
    if mscale_all:
        attn_scale = qk_head_dim ** -0.5 * yarn_mscale(scaling.factor, mscale_all) ** 2
    return theta, scaling, attn_scale


def _moe(cfg: dict[str, Any], n_layers: int, path: str) -> dict[str, Any]:
    """The ModelConfig fields of DeepSeek's experts and router ({} when no layer is MoE)."""
    model_type = cfg["model_type"]
    n = _int(cfg, "n_routed_experts", path, 0, low=0)
    first = _int(cfg, "first_k_dense_replace", path, 0, low=0)
    freq = _int(cfg, "moe_layer_freq", path, 1)
    layers = tuple(bool(n) and i >= first and i % freq == 0 for i in range(n_layers))
    if not any(layers):
        return {}
    k = _int(cfg, "num_experts_per_tok", path)
    if k > n:
        raise WeightsError(path, f"num_experts_per_tok is {k}; expected at most n_routed_experts ({n})")
    for key, allowed in (("topk_method", _TOPK_METHODS[model_type]), ("scoring_func", _SCORING[model_type])):
        if cfg.get(key) not in allowed:
            raise WeightsError(path, f"{key} is {show(cfg.get(key))}: not implemented for {model_type} (supported: "
                                     f"{', '.join(a for a in allowed if a)})")
    v3 = model_type == "deepseek_v3"
    if not v3 and _bool(cfg, "mlp_bias", path, False):
        raise WeightsError(path, "mlp_bias is true: DeepSeek's routed experts have no biases, and loom's MoE layers "
                                 "none at all (supported: false)")
    norm = _bool(cfg, "norm_topk_prob", path, False)
    if norm and not v3:
        raise WeightsError(path, "norm_topk_prob is true: transformers' deepseek_v2 ignores it while DeepSeek's own "
                                 "code renormalizes, so its meaning is ambiguous (supported: false)")
    groups = topk_groups = 1
    if v3 or cfg.get("topk_method") == "group_limited_greedy":
        groups = _int(cfg, "n_group", path, 1)
        topk_groups = _int(cfg, "topk_group", path, 1)
        if n % groups or topk_groups > groups:
            raise WeightsError(path, f"n_group {groups} must divide n_routed_experts ({n}) and topk_group "
                                     f"({topk_groups}) be at most n_group")
        if k > topk_groups * (n // groups):
            raise WeightsError(path, f"num_experts_per_tok {k} exceeds the experts of the topk_group {topk_groups} "
                                     f"groups ({topk_groups * (n // groups)})")
        if v3 and groups > 1 and n // groups < 2:
            raise WeightsError(path, f"n_group is {groups}: noaux_tc scores a group by its best two experts, so "
                                     "groups need at least two")
    moe = _int(cfg, "moe_intermediate_size", path)
    shared = _int(cfg, "n_shared_experts", path, 0, low=0)
    return dict(num_experts=n, num_experts_per_tok=k, moe_intermediate_size=moe, norm_topk_prob=norm,
                shared_expert_intermediate_size=shared * moe, shared_expert_gated=False,
                moe_layers=None if all(layers) else layers, moe_scoring="sigmoid" if v3 else "softmax",
                moe_score_bias=v3, moe_groups=groups, moe_topk_groups=topk_groups,
                moe_routed_scale=checked_number(cfg.get("routed_scaling_factor", 1.0), "routed_scaling_factor",
                                                path, above=0))


def _deepseek_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    model_type = cfg["model_type"]
    hidden, n_heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    n_layers = _int(cfg, "num_hidden_layers", path, high=MAX_LAYERS)
    max_pos = _int(cfg, "max_position_embeddings", path, 2048, high=MAX_CONTEXT)
    nope, rope = _int(cfg, "qk_nope_head_dim", path, low=0), _int(cfg, "qk_rope_head_dim", path)
    if rope % 2:
        raise WeightsError(path, f"qk_rope_head_dim is {rope}; RoPE rotates pairs, so it must be even")
    theta, scaling, attn_scale = _rope(cfg, max_pos, nope + rope, path)
    max_pos, scaling = scaled_context(max_pos, scaling)
    check_scaled_context(max_pos, "the rope scaling factor", path)
    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise WeightsError(path, f"unsupported hidden_act {show(act)}")
    bias = _bool(cfg, "attention_bias", path, False)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=_int(cfg, "vocab_size", path), hidden_size=hidden, num_layers=n_layers, num_heads=n_heads,
        num_kv_heads=n_heads, intermediate_size=_int(cfg, "intermediate_size", path), activation=_ACTIVATIONS[act],
        norm_eps=checked_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", path, low=0),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos, attn_scale=attn_scale,
        qkv_bias=bias, attn_out_bias=bias,
        mlp_bias=model_type == "deepseek_v2" and _bool(cfg, "mlp_bias", path, False),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", path, False),
        kv_lora_rank=_int(cfg, "kv_lora_rank", path), q_lora_rank=_int(cfg, "q_lora_rank", path, 0),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=_int(cfg, "v_head_dim", path),
        rope_interleave=model_type == "deepseek_v2" or _bool(cfg, "rope_interleave", path, True),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, architecture=model_type,
        unused_stored_layers=_int(cfg, "num_nextn_predict_layers", path, 0, low=0, high=MAX_LAYERS),
        name=str(cfg.get("_name_or_path", "")), **_moe(cfg, n_layers, path))


def _deepseek_sources(config: ModelConfig) -> dict[str, list[str]]:
    src: dict[str, list[str]] = {"embed_tokens.weight": ["model.embed_tokens.weight"],
                                 "norm.weight": ["model.norm.weight"]}
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["lm_head.weight"]
    biases = ("weight", "bias") if config.qkv_bias else ("weight",)
    for i in range(config.num_layers):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        a, sa = p + "attn.", h + "self_attn."
        src[p + "attn_norm.weight"] = [h + "input_layernorm.weight"]
        src[p + "mlp_norm.weight"] = [h + "post_attention_layernorm.weight"]
        if config.q_lora_rank:
            for x in biases:
                src[a + f"q_a_proj.{x}"] = [sa + f"q_a_proj.{x}"]
            src[a + "q_a_norm.weight"] = [sa + "q_a_layernorm.weight"]
            src[a + "q_b_proj.weight"] = [sa + "q_b_proj.weight"]
        else:
            src[a + "q_proj.weight"] = [sa + "q_proj.weight"]
        for x in biases:
            src[a + f"kv_a_proj.{x}"] = [sa + f"kv_a_proj_with_mqa.{x}"]
        src[a + "kv_a_norm.weight"] = [sa + "kv_a_layernorm.weight"]
        src[a + "kv_b_proj.weight"] = [sa + "kv_b_proj.weight"]
        src[a + "o_proj.weight"] = [sa + "o_proj.weight"]
        if config.attn_out_bias:
            src[a + "o_proj.bias"] = [sa + "o_proj.bias"]
        m, sm = p + "mlp.", h + "mlp."
        if not config.is_moe_layer(i):
            suffixes = ("weight", "bias") if config.mlp_bias else ("weight",)
            for x in suffixes:
                src[m + f"gate_up_proj.{x}"] = [sm + f"gate_proj.{x}", sm + f"up_proj.{x}"]
                src[m + f"down_proj.{x}"] = [sm + f"down_proj.{x}"]
            continue
        src[m + "router.weight"] = [sm + "gate.weight"]
        if config.moe_score_bias:
            src[m + "score_bias"] = [sm + "gate.e_score_correction_bias"]
        experts = [(f"experts.{e}.", f"experts.{e}.") for e in range(config.num_experts)]
        if config.shared_expert_intermediate_size:
            experts.append(("shared_expert.", "shared_experts."))
        for mine, theirs in experts:
            src[m + mine + "gate_up_proj.weight"] = [sm + theirs + "gate_proj.weight", sm + theirs + "up_proj.weight"]
            src[m + mine + "down_proj.weight"] = [sm + theirs + "down_proj.weight"]
    return src


register_family(("deepseek_v2", "deepseek_v3"), HFFamily(_deepseek_config, _deepseek_sources))
