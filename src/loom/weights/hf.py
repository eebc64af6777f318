"""Hugging Face checkpoints: config.json -> ModelConfig, and safetensors shards -> tensors.

Supported ``model_type``: llama, mistral, qwen2 (all Llama-shaped decoders: RMSNorm, SwiGLU,
rotate-half RoPE; Qwen2 adds q/k/v biases; Mistral and Qwen2 may use sliding windows).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open

from loom.config import ROPE_SCALING_KINDS, ModelConfig, RopeScaling, scaled_context
from loom.weights.errors import WeightsError

HF_ARCHITECTURES = ("llama", "mistral", "qwen2")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


def _rope_settings(cfg: dict[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either the classic keys or transformers 5's ``rope_parameters``.

    ``rope_scaling`` spells the kind "type" (older configs) or "rope_type"; YaRN reads its optional
    beta_fast / beta_slow / attention_factor / truncate and, as transformers does, takes
    factor = max_position_embeddings / original_max_position_embeddings when no factor is given.
    """
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if isinstance(params, dict) and "rope_type" in params and not scaling:
        scaling = params
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind not in ROPE_SCALING_KINDS:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_SCALING_KINDS)})")
    unsupported = [k for k in ("mscale", "mscale_all_dim") if scaling.get(k)]
    if unsupported:
        raise ValueError(f"rope scaling parameters {unsupported} are not supported")
    original = scaling.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    factor = scaling.get("factor")
    if factor is None:
        if kind != "yarn" or not original:
            raise ValueError(f"rope scaling {kind!r} needs a factor")
        factor = max_pos / original
    attention = scaling.get("attention_factor")
    return theta, RopeScaling(
        kind=kind, factor=float(factor), original_max_position=int(original) if original else None,
        beta_fast=float(scaling.get("beta_fast") or 32.0), beta_slow=float(scaling.get("beta_slow") or 1.0),
        attention_factor=float(attention) if attention is not None else None,
        truncate=bool(scaling.get("truncate", True)))


def config_from_hf(cfg: dict[str, Any], path: str = "config.json") -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise WeightsError(path, f"unsupported model_type {model_type!r} (supported: {', '.join(HF_ARCHITECTURES)})")
    try:
        hidden, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        theta, scaling = _rope_settings(cfg, max_pos)
        max_pos, scaling = scaled_context(max_pos, scaling)
        head_dim = cfg.get("head_dim") or hidden // n_heads
        act = cfg.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise WeightsError(path, f"unsupported hidden_act {act!r}")
        window = cfg.get("sliding_window")
        window_layers = None
        if model_type == "qwen2":
            if not cfg.get("use_sliding_window", False):
                window = None
            elif window:
                types = cfg.get("layer_types")
                if types:
                    window_layers = tuple(t == "sliding_attention" for t in types)
                else:
                    first = int(cfg.get("max_window_layers", 0))
                    window_layers = tuple(i >= first for i in range(int(cfg["num_hidden_layers"])))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            intermediate_size=int(cfg["intermediate_size"]),
            activation=_ACTIVATIONS[act],
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            attn_out_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            sliding_window_layers=window_layers,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=model_type,
            name=str(cfg.get("_name_or_path", "")),
        )
    except KeyError as e:
        raise WeightsError(path, f"config is missing {e.args[0]!r}") from None
    except ValueError as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(path, str(e)) from None


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The config.json that ``config_from_hf`` reads back as ``config`` (Llama-shaped models)."""
    if config.architecture not in HF_ARCHITECTURES:
        raise ValueError(f"cannot write a Hugging Face config for architecture {config.architecture!r}")
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[config.activation]
    cfg: dict[str, Any] = {
        "model_type": config.architecture, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "hidden_act": act, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": config.mlp_bias, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "torch_dtype": "float32",
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0],
    }
    if config.architecture != "qwen2" or config.attn_out_bias:
        cfg["attention_bias"] = config.qkv_bias
    if config.sliding_window:
        cfg["sliding_window"] = config.sliding_window
        if config.architecture == "qwen2":
            cfg["use_sliding_window"] = True
            if config.sliding_window_layers is not None:
                cfg["layer_types"] = ["sliding_attention" if w else "full_attention"
                                      for w in config.sliding_window_layers]
    if config.rope_scaling is not None:
        r = config.rope_scaling
        cfg["rope_scaling"] = {"rope_type": r.kind, "factor": r.factor, "beta_fast": r.beta_fast,
                               "beta_slow": r.beta_slow, "original_max_position_embeddings": r.original_max_position,
                               "truncate": r.truncate}
        if r.attention_factor is not None:
            cfg["rope_scaling"]["attention_factor"] = r.attention_factor
    return cfg


def read_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise WeightsError(folder, "no config.json in the folder") from None
    except json.JSONDecodeError as e:
        raise WeightsError(path, f"invalid JSON: {e}") from None
    return config_from_hf(cfg, path)


class SafetensorsCheckpoint:
    """Tensors of one or many safetensors shards (with model.safetensors.index.json)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(x for x in os.listdir(folder) if x.endswith(".safetensors"))
            if not files:
                raise WeightsError(folder, "no .safetensors files in the folder")
            weight_map = {}
        self._handles = {}
        for fname in files:
            path = os.path.join(folder, fname)
            try:
                self._handles[fname] = safe_open(path, framework="pt")
            except FileNotFoundError:
                raise WeightsError(path, "shard listed in the index is missing") from None
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise WeightsError(path, f"cannot read safetensors file: {e}") from None
            if not weight_map or fname not in weight_map.values():
                for key in self._handles[fname].keys():
                    weight_map[key] = fname
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        fname = self.weight_map.get(name)
        if fname is None:
            raise WeightsError(self.folder, "tensor is missing from the checkpoint", name)
        try:
            return self._handles[fname].get_tensor(name)
        except Exception as e:
            raise WeightsError(os.path.join(self.folder, fname), f"cannot read tensor: {e}", name) from None


def hf_tensor_sources(config: ModelConfig, checkpoint: SafetensorsCheckpoint) -> dict[str, list[str]]:
    """loom parameter name -> HF tensor names concatenated (along rows) to make it."""
    src: dict[str, list[str]] = {"embed_tokens.weight": ["model.embed_tokens.weight"],
                                 "norm.weight": ["model.norm.weight"]}
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        src[p + "attn_norm.weight"] = [h + "input_layernorm.weight"]
        src[p + "attn.qkv_proj.weight"] = [h + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if config.qkv_bias:
            src[p + "attn.qkv_proj.bias"] = [h + f"self_attn.{x}_proj.bias" for x in "qkv"]
        src[p + "attn.o_proj.weight"] = [h + "self_attn.o_proj.weight"]
        if config.attn_out_bias:
            src[p + "attn.o_proj.bias"] = [h + "self_attn.o_proj.bias"]
        src[p + "mlp_norm.weight"] = [h + "post_attention_layernorm.weight"]
        src[p + "mlp.gate_up_proj.weight"] = [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]
        src[p + "mlp.down_proj.weight"] = [h + "mlp.down_proj.weight"]
        if config.mlp_bias:
            src[p + "mlp.gate_up_proj.bias"] = [h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias"]
            src[p + "mlp.down_proj.bias"] = [h + "mlp.down_proj.bias"]
    return src
