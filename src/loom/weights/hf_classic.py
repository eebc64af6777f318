"""Hugging Face layouts of three classic decoders: GPT-2, OPT and BLOOM (``model_type`` gpt2, opt, bloom).

All three are LayerNorm decoders with biases, a plain (ungated) MLP and a tied output layer; they differ
in positions, activation and storage:

  GPT-2  learned absolute positions (``wpe``), pre-norm, gelu_new (GELU's tanh form), and Conv1D linears
         stored [in, out] (transposed here), q|k|v fused in one ``c_attn``.
  OPT    learned positions read at position + 2 (``embed_positions`` has 2 extra rows), ReLU, separate
         q/k/v; pre-norm with a final norm, or (OPT-350m, ``do_layer_norm_before: false``) post-norm
         without one; a token embedding narrower than the residual stream (``word_embed_proj_dim``)
         is projected in and out (``project_in`` / ``project_out``).
  BLOOM  ALiBi (no position table), a LayerNorm right after the embedding (``word_embeddings_layernorm``),
         bloom_gelu (the tanh form), q|k|v fused in ``query_key_value`` interleaved per head
         ([heads, 3, head_dim] rows, re-laid-out here as loom's q|k|v rows).

Checkpoints saved from the causal-LM class name the base model's tensors ``transformer.`` (GPT-2,
BLOOM) or ``model.`` (OPT); the original uploads were saved from the base model and lack the prefix:
both read (``HFFamily.base_prefix``). Options that would change the arithmetic loom computes are
refused with a WeightsError naming config.json and the key.
"""

from __future__ import annotations

from typing import Any

import torch

from loom.config import MAX_CONTEXT, ModelConfig
from loom.weights.errors import WeightsError
from loom.weights.hf import _ACTIVATIONS, HFFamily, _int, register_family
from loom.weights.validate import MAX_LAYERS, checked_number, show


def _first_key(cfg: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of ``keys`` (a setting's spellings: n_embd, hidden_size) that config.json sets (else the first)."""
    return next((k for k in keys if cfg.get(k) is not None), keys[0])


def _size(cfg: dict[str, Any], keys: tuple[str, ...], path: str, default: Any = None, **bounds: Any) -> Any:
    key = _first_key(cfg, keys)
    return _int(cfg, key, path, **bounds) if default is None else _int(cfg, key, path, default, **bounds)


def _refuse(cfg: dict[str, Any], path: str, key: str, default: Any, why: str) -> None:
    """A WeightsError naming ``key`` when config.json sets it to anything but ``default``."""
    value = cfg.get(key, default)
    if value is None:
        value = default
    if value != default:
        raise WeightsError(path, f"{key} is {show(value)}: {why}; loom supports only {show(default)}")


def _activation(cfg: dict[str, Any], path: str, default: str) -> str:
    act = cfg.get("activation_function", default)
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise WeightsError(path, f"unsupported activation_function {show(act)} "
                                 f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[act]


def _heads(hidden: int, n_heads: int, key: str, path: str) -> int:
    if hidden % n_heads:
        raise WeightsError(path, f"hidden size {hidden} is not a multiple of {key} {n_heads}")
    return hidden // n_heads


def _token_ids(cfg: dict[str, Any]) -> dict[str, Any]:
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return dict(bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, architecture=cfg["model_type"],
                name=str(cfg.get("_name_or_path", "")))


def _classic(**kwargs: Any) -> ModelConfig:
    """A LayerNorm decoder with biases everywhere and a plain MLP (the three families' common ground)."""
    settings: dict[str, Any] = dict(norm="layernorm", norm_bias=True, gated_mlp=False, qkv_bias=True,
                                    attn_out_bias=True, mlp_bias=True)
    settings.update(kwargs)
    return ModelConfig(**settings)


# GPT-2 -------------------------------------------------------------------------------------------

def _gpt2_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    _refuse(cfg, path, "scale_attn_weights", True, "unscaled attention logits (no 1/sqrt(head_dim))")
    _refuse(cfg, path, "scale_attn_by_inverse_layer_idx", False, "logits scaled by 1 / (layer + 1)")
    # reorder_and_upcast_attn only computes q k^T in fp32 (loom's fp32 arithmetic is the same): accepted.
    hidden = _size(cfg, ("n_embd", "hidden_size"), path)
    n_heads = _size(cfg, ("n_head", "num_attention_heads"), path)
    return _classic(
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=hidden,
        num_layers=_size(cfg, ("n_layer", "num_hidden_layers"), path, high=MAX_LAYERS),
        num_heads=n_heads,
        head_dim=_heads(hidden, n_heads, _first_key(cfg, ("n_head", "num_attention_heads")), path),
        intermediate_size=_size(cfg, ("n_inner",), path, 4 * hidden),
        activation=_activation(cfg, path, "gelu_new"),
        norm_eps=checked_number(cfg.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", path, low=0),
        position="learned",
        max_position_embeddings=_size(cfg, ("n_positions", "max_position_embeddings"), path, 1024,
                                      high=MAX_CONTEXT),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **_token_ids(cfg),
    )


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_transform(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Conv1D weights are stored [in, out]: loom's linears hold [out, in]."""
    return t.t() if name.endswith(_CONV1D) and t.dim() == 2 else t


def _gpt2_sources(config: ModelConfig) -> dict[str, list[str]]:
    src: dict[str, list[str]] = {"embed_tokens.weight": ["transformer.wte.weight"],
                                 "pos_embed.weight": ["transformer.wpe.weight"],
                                 "norm.weight": ["transformer.ln_f.weight"], "norm.bias": ["transformer.ln_f.bias"]}
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        h, p = f"transformer.h.{i}.", f"layers.{i}."
        for loom, hf in (("attn_norm", "ln_1"), ("attn.qkv_proj", "attn.c_attn"), ("attn.o_proj", "attn.c_proj"),
                         ("mlp_norm", "ln_2"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            for x in ("weight", "bias"):
                src[f"{p}{loom}.{x}"] = [f"{h}{hf}.{x}"]
    return src


# OPT ---------------------------------------------------------------------------------------------

OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reads row position + 2


def _opt_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    _refuse(cfg, path, "layer_norm_elementwise_affine", True, "LayerNorms without weight and bias")
    hidden, n_heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    pre_norm = bool(cfg.get("do_layer_norm_before", True))
    bias = bool(cfg.get("enable_bias", True))
    return ModelConfig(
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=hidden,
        num_layers=_int(cfg, "num_hidden_layers", path, high=MAX_LAYERS),
        num_heads=n_heads,
        head_dim=_heads(hidden, n_heads, "num_attention_heads", path),
        intermediate_size=_int(cfg, "ffn_dim", path, 3072),
        activation=_activation(cfg, path, "relu"),
        gated_mlp=False,
        norm="layernorm",
        norm_bias=True,
        norm_eps=1e-5,  # nn.LayerNorm's default: OPT's config has no epsilon
        norm_placement="pre" if pre_norm else "post",
        # post-norm layers end normalized; a pre-norm model has a final norm unless an old fine-tune removed it
        final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
        position="learned",
        position_offset=OPT_POSITION_OFFSET,
        max_position_embeddings=_int(cfg, "max_position_embeddings", path, 2048, high=MAX_CONTEXT),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        embedding_size=_int(cfg, "word_embed_proj_dim", path, hidden),
        **_token_ids(cfg),
    )


def _opt_sources(config: ModelConfig) -> dict[str, list[str]]:
    d = "model.decoder."
    src: dict[str, list[str]] = {"embed_tokens.weight": [d + "embed_tokens.weight"],
                                 "pos_embed.weight": [d + "embed_positions.weight"]}
    if config.final_norm:
        src["norm.weight"], src["norm.bias"] = [d + "final_layer_norm.weight"], [d + "final_layer_norm.bias"]
    if config.embedding_size != config.hidden_size:
        src["project_in.weight"], src["project_out.weight"] = [d + "project_in.weight"], [d + "project_out.weight"]
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["lm_head.weight"]
    xs = ("weight", "bias") if config.qkv_bias else ("weight",)
    for i in range(config.num_layers):
        h, p = f"{d}layers.{i}.", f"layers.{i}."
        for x in ("weight", "bias"):
            src[f"{p}attn_norm.{x}"] = [f"{h}self_attn_layer_norm.{x}"]
            src[f"{p}mlp_norm.{x}"] = [f"{h}final_layer_norm.{x}"]
        for x in xs:
            src[f"{p}attn.qkv_proj.{x}"] = [f"{h}self_attn.{q}_proj.{x}" for q in "qkv"]
            src[f"{p}attn.o_proj.{x}"] = [f"{h}self_attn.out_proj.{x}"]
            src[f"{p}mlp.up_proj.{x}"] = [f"{h}fc1.{x}"]
            src[f"{p}mlp.down_proj.{x}"] = [f"{h}fc2.{x}"]
    return src


# BLOOM -------------------------------------------------------------------------------------------

def _bloom_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    _refuse(cfg, path, "apply_residual_connection_post_layernorm", False,
            "residuals taken after the layer norms")
    # pretraining_tp / slow_but_exact only split the dense sums into slices, the same arithmetic: accepted.
    # (transformers' slow_but_exact path also drops the dense layers' biases; loom keeps them, as trained.)
    hidden = _size(cfg, ("n_embed", "hidden_size"), path)  # transformers: n_embed, when given, wins
    heads_key = _first_key(cfg, ("n_head", "num_attention_heads"))
    n_heads = _int(cfg, heads_key, path)
    # ALiBi has no position table: the context is the one trained (seq_length), else 2048
    context = _size(cfg, ("max_position_embeddings", "seq_length"), path, 2048, high=MAX_CONTEXT)
    return _classic(
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=hidden,
        num_layers=_size(cfg, ("n_layer", "num_hidden_layers"), path, high=MAX_LAYERS),
        num_heads=n_heads,
        head_dim=_heads(hidden, n_heads, heads_key, path),
        intermediate_size=4 * hidden,
        activation="gelu_tanh",  # bloom_gelu: x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x^2)))
        norm_eps=checked_number(cfg.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", path, low=0),
        position="alibi",
        max_position_embeddings=context,
        embedding_norm=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **_token_ids(cfg),
    )


_BLOOM_QKV = (".self_attention.query_key_value.weight", ".self_attention.query_key_value.bias")


def _bloom_transform(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """query_key_value's rows are [heads, 3, head_dim] (each head's q, k, v together): loom's are q | k | v
    ([3, heads, head_dim])."""
    h, d = config.num_heads, config.head_dim
    if not name.endswith(_BLOOM_QKV) or t.dim() < 1 or t.shape[0] != 3 * h * d:
        return t
    return t.reshape(h, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _bloom_sources(config: ModelConfig) -> dict[str, list[str]]:
    b = "transformer."
    src: dict[str, list[str]] = {"embed_tokens.weight": [b + "word_embeddings.weight"]}
    for x in ("weight", "bias"):
        src[f"embed_norm.{x}"] = [f"{b}word_embeddings_layernorm.{x}"]
        src[f"norm.{x}"] = [f"{b}ln_f.{x}"]
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        h, p = f"{b}h.{i}.", f"layers.{i}."
        for loom, hf in (("attn_norm", "input_layernorm"), ("attn.qkv_proj", "self_attention.query_key_value"),
                         ("attn.o_proj", "self_attention.dense"), ("mlp_norm", "post_attention_layernorm"),
                         ("mlp.up_proj", "mlp.dense_h_to_4h"), ("mlp.down_proj", "mlp.dense_4h_to_h")):
            for x in ("weight", "bias"):
                src[f"{p}{loom}.{x}"] = [f"{h}{hf}.{x}"]
    return src


register_family(("gpt2",), HFFamily(_gpt2_config, _gpt2_sources, "transformer.h.", _gpt2_transform, "transformer.",
                                    "n_layer"))
register_family(("opt",), HFFamily(_opt_config, _opt_sources, "model.decoder.layers.", None, "model."))
register_family(("bloom",), HFFamily(_bloom_config, _bloom_sources, "transformer.h.", _bloom_transform, "transformer.",
                                     "n_layer"))
