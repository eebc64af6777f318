"""Hugging Face mixture-of-experts checkpoints: mixtral, qwen2_moe, qwen3_moe and olmoe (layers/moe.py).

Their attention and norms are Llama's (``_llama_config`` reads those keys); what differs:

    mixtral    every layer MoE: ``num_local_experts`` experts of ``intermediate_size``, top
               ``num_experts_per_tok``, weights always renormalized; tensors under
               ``block_sparse_moe.``: ``gate`` (router), ``experts.E.w1`` (gate), ``w3`` (up), ``w2`` (down)
    qwen2_moe  ``num_experts`` of ``moe_intermediate_size``, renormalized only with ``norm_topk_prob``, a
               shared expert of ``shared_expert_intermediate_size`` with a sigmoid gate; a layer is MoE when
               it is not in ``mlp_only_layers`` and (i + 1) % ``decoder_sparse_step`` == 0, else a dense MLP of
               ``intermediate_size``; q/k/v biases (``qkv_bias``); tensors under ``mlp.``: ``gate``,
               ``experts.E.{gate,up,down}_proj``, ``shared_expert.*``, ``shared_expert_gate``
    qwen3_moe  Qwen2-MoE's experts and layer selection (``num_experts``, or ``num_local_experts`` as
               transformers 5 saves it) without a shared expert; per-head QK-norm (``ModelConfig.qk_norm``);
               a sliding window on every layer when ``use_sliding_window``
    olmoe      ``num_experts`` of ``intermediate_size``, ``norm_topk_prob``; QK-norm over the whole q and k
               projections (``self_attn.q_norm``, ``k_norm``: ``ModelConfig.qk_norm_full``)

The checkpoints are read as transformers saves them (and as they are published): one tensor per expert
and projection. Options loom does not implement (OLMoE's ``clip_qkv``, router jitter at inference is
a no-op and ignored) are refused with a WeightsError naming the file and key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loom.config import ModelConfig
from loom.weights.errors import WeightsError
from loom.weights.hf import HFFamily, _int, _llama_config, _llama_sources, _window_layers, register_family
from loom.weights.validate import show

# Router kinds loom's MoE computes (softmax over the experts, then top-k); others are refused by name.
_SOFTMAX_SCORING = (None, "softmax")


def _experts(cfg: dict[str, Any], path: str, key: str) -> tuple[int, int]:
    """(num_experts, num_experts_per_tok), k checked to be at most E."""
    n = _int(cfg, key, path)
    k = _int(cfg, "num_experts_per_tok", path)
    if k > n:
        raise WeightsError(path, f"num_experts_per_tok is {k}; expected at most {key} ({n})")
    scoring = cfg.get("scoring_func")
    if scoring not in _SOFTMAX_SCORING:
        raise WeightsError(path, f"scoring_func is {show(scoring)}; loom's router is a softmax (supported: softmax)")
    return n, k


def _bool(cfg: dict[str, Any], key: str, path: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WeightsError(path, f"{key} is {show(value)}; expected true or false")
    return value


def _mixtral_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    base = _llama_config(cfg, path)
    n, k = _experts(cfg, path, "num_local_experts")
    return dataclasses.replace(base, num_experts=n, num_experts_per_tok=k,
                               moe_intermediate_size=base.intermediate_size, norm_topk_prob=True)


def _sparse_layers(cfg: dict[str, Any], n_layers: int, path: str) -> tuple[bool, ...] | None:
    """Qwen-MoE's MoE layers: those not in ``mlp_only_layers`` with (i + 1) % ``decoder_sparse_step`` == 0 (None:
    all of them)."""
    step = _int(cfg, "decoder_sparse_step", path, 1)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise WeightsError(path, f"mlp_only_layers is {show(dense)}; expected a list of layer numbers")
    moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))
    return None if all(moe_layers) else moe_layers


def _qwen2_moe_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    base = _llama_config(cfg, path)
    n_layers = base.num_layers
    n, k = _experts(cfg, path, "num_experts")
    window, window_layers = None, None
    if _bool(cfg, "use_sliding_window", path, False):
        window = _int(cfg, "sliding_window", path, None, low=0) or None
        if window and cfg.get("layer_types"):
            window_layers = _window_layers(cfg, n_layers, path)
        elif window:  # transformers' default for Qwen2-MoE: odd-numbered layers (1st, 3rd, ...) below max_window_layers
            first = _int(cfg, "max_window_layers", path, n_layers, low=0)
            window_layers = tuple((i + 1) % 2 == 1 and i < first for i in range(n_layers))
    shared = _int(cfg, "shared_expert_intermediate_size", path, 0, low=0)
    return dataclasses.replace(
        base, qkv_bias=_bool(cfg, "qkv_bias", path, True), attn_out_bias=False,
        sliding_window=window, sliding_window_layers=window_layers,
        num_experts=n, num_experts_per_tok=k, moe_intermediate_size=_int(cfg, "moe_intermediate_size", path),
        norm_topk_prob=_bool(cfg, "norm_topk_prob", path, False), shared_expert_intermediate_size=shared,
        moe_layers=_sparse_layers(cfg, n_layers, path))


def _qwen3_moe_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    """Qwen3-MoE: Qwen2-MoE's experts and layer selection without a shared expert, per-head QK-norm, a sliding
    window on every layer when ``use_sliding_window``."""
    base = _llama_config(cfg, path)
    n, k = _experts(cfg, path, "num_experts" if cfg.get("num_experts") is not None else "num_local_experts")
    window = None
    if _bool(cfg, "use_sliding_window", path, False):
        window = _int(cfg, "sliding_window", path, None, low=0) or None
    return dataclasses.replace(
        base, qk_norm=True, sliding_window=window, sliding_window_layers=None, num_experts=n, num_experts_per_tok=k,
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", path),
        norm_topk_prob=_bool(cfg, "norm_topk_prob", path, False), moe_layers=_sparse_layers(cfg, base.num_layers, path))


def _olmoe_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    if cfg.get("clip_qkv") is not None:
        raise WeightsError(path, f"clip_qkv is {show(cfg['clip_qkv'])}: clipping q, k and v is not implemented "
                                 "(supported: null)")
    base = _llama_config(cfg, path)
    n, k = _experts(cfg, path, "num_experts")
    if base.q_size != base.hidden_size:
        raise WeightsError(path, f"head_dim is {base.head_dim}: OLMoE's q_norm spans hidden_size, so head_dim must "
                                 "be hidden_size / num_attention_heads")
    return dataclasses.replace(base, qk_norm_full=True, num_experts=n, num_experts_per_tok=k,
                               moe_intermediate_size=base.intermediate_size,
                               norm_topk_prob=_bool(cfg, "norm_topk_prob", path, False))


def _moe_sources(config: ModelConfig, block: str, names: dict[str, str]) -> dict[str, list[str]]:
    """Sources of every MoE layer's MLP (the rest is Llama's). ``block``: the stored MoE module under
    ``model.layers.N.``; ``names``: the stored names of router, gate, up, down."""
    src = {k: v for k, v in _llama_sources(config).items()
           if not (".mlp." in k and config.is_moe_layer(int(k.split(".")[1])))}
    for i in range(config.num_layers):
        if not config.is_moe_layer(i):
            continue
        h, p = f"model.layers.{i}.{block}.", f"layers.{i}.mlp."
        src[p + "router.weight"] = [h + names["router"]]
        for e in range(config.num_experts):
            x = f"{h}experts.{e}."
            src[p + f"experts.{e}.gate_up_proj.weight"] = [x + names["gate"], x + names["up"]]
            src[p + f"experts.{e}.down_proj.weight"] = [x + names["down"]]
        if config.shared_expert_intermediate_size:
            src[p + "shared_expert.gate_up_proj.weight"] = [h + "shared_expert.gate_proj.weight",
                                                            h + "shared_expert.up_proj.weight"]
            src[p + "shared_expert.down_proj.weight"] = [h + "shared_expert.down_proj.weight"]
            src[p + "shared_expert_gate.weight"] = [h + "shared_expert_gate.weight"]
    return src


_MIXTRAL_NAMES = {"router": "gate.weight", "gate": "w1.weight", "up": "w3.weight", "down": "w2.weight"}
_QWEN_NAMES = {"router": "gate.weight", "gate": "gate_proj.weight", "up": "up_proj.weight",
               "down": "down_proj.weight"}


def _mixtral_sources(config: ModelConfig) -> dict[str, list[str]]:
    return _moe_sources(config, "block_sparse_moe", _MIXTRAL_NAMES)


def _qwen2_moe_sources(config: ModelConfig) -> dict[str, list[str]]:
    return _moe_sources(config, "mlp", _QWEN_NAMES)


def _qwen3_moe_sources(config: ModelConfig) -> dict[str, list[str]]:
    src = _moe_sources(config, "mlp", _QWEN_NAMES)
    for i in range(config.num_layers):
        for x in "qk":
            src[f"layers.{i}.attn.{x}_norm.weight"] = [f"model.layers.{i}.self_attn.{x}_norm.weight"]
    return src


def _olmoe_sources(config: ModelConfig) -> dict[str, list[str]]:
    src = _moe_sources(config, "mlp", _QWEN_NAMES)
    for i in range(config.num_layers):
        src[f"layers.{i}.attn.qk_norm_full.q.weight"] = [f"model.layers.{i}.self_attn.q_norm.weight"]
        src[f"layers.{i}.attn.qk_norm_full.k.weight"] = [f"model.layers.{i}.self_attn.k_norm.weight"]
    return src


register_family(("mixtral",), HFFamily(_mixtral_config, _mixtral_sources))
register_family(("qwen2_moe",), HFFamily(_qwen2_moe_config, _qwen2_moe_sources))
register_family(("qwen3_moe",), HFFamily(_qwen3_moe_config, _qwen3_moe_sources))
register_family(("olmoe",), HFFamily(_olmoe_config, _olmoe_sources))
