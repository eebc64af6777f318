"""Hugging Face T5 checkpoints (``T5ForConditionalGeneration`` folders: t5-small ... t5-11b, T5 v1.1, Flan-T5, mT5):
config.json -> ``T5Config``, the tensors of model.safetensors (sharded or not) or pytorch_model.bin -> a ``T5``.

Not an ``HFFamily`` of weights/hf.py: those describe decoder-only ``Transformer``s built from a ``ModelConfig``,
and a T5 model has two stacks, cross-attention and relative position buckets. Like the decoder families, every
value of config.json is checked before anything is sized from it, the layer counts and every tensor's shape are
checked against the checkpoint before the model is allocated, and each refusal is a ``WeightsError`` naming the
file and the key or tensor at fault.

Which output layer and scale (transformers 5.x, the reference): the output layer is ``lm_head.weight`` when the
checkpoint stores one, else the shared embedding; T5 multiplies the decoder's output by d_model^-1/2 unless
config.json says ``scale_decoder_outputs: false`` or (older files) ``tie_word_embeddings: false``; mT5 never does.

``model_type`` mt5 is T5 v1.1's architecture (gated-gelu, untied head) and loads here; umt5 gives every layer its
own relative position table and is refused by name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from loom.models.t5 import T5, T5Config
from loom.weights.encoder import Checkpoint, fill_and_place, open_encoder_checkpoint
from loom.weights.errors import WeightsError
from loom.weights.hf import _ACTIVATIONS, _int, _read_json
from loom.weights.loader import resolve_dtype
from loom.weights.validate import MAX_LAYERS, check_layer_count, checked_number, layer_indices, show

T5_ARCHITECTURES = ("t5", "mt5")
REFUSED = {"umt5": "umt5 gives every layer its own relative position bias table (T5 and mT5 share the first "
                   "layer's); loom does not implement it"}
MAX_POSITIONS = 1 << 20
# transformers' defaults for keys a config.json leaves out (T5Config's, MT5Config's)
DEFAULTS = {"t5": {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
                   "feed_forward_proj": "relu"},
            "mt5": {"vocab_size": 250112, "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
                    "feed_forward_proj": "gated-gelu"}}
_RELATIVE_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def is_t5_folder(path: str) -> bool:
    """Whether ``path`` is a folder whose config.json names a T5-style encoder-decoder (t5, mt5, or one refused by
    name when loaded, umt5); a malformed config.json is not (the decoder loader reports it)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in (*T5_ARCHITECTURES, *REFUSED)


def _feed_forward(value: Any, path: str) -> tuple[str, bool]:
    """(activation, gated) of ``feed_forward_proj``: "relu", "gelu", "gated-gelu" (gelu_new, the tanh form, as
    transformers maps it), "gated-silu", ..."""
    parts = value.split("-") if isinstance(value, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise WeightsError(path, f"feed_forward_proj is {show(value)}; expected an activation or gated-<activation> "
                                 "(relu, gated-gelu, ...)")
    act = "gelu_new" if value == "gated-gelu" else parts[-1]
    if act not in _ACTIVATIONS:
        raise WeightsError(path, f"feed_forward_proj {value!r}: activation {act!r} is not supported (supported: "
                                 f"{', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[act], len(parts) == 2


def _token_id(cfg: dict[str, Any], key: str, path: str, default: int | None) -> int | None:
    value = cfg.get(key)
    if value is None:
        return default
    return _int(cfg, key, path, low=0)


def t5_config_from_hf(cfg: Any, path: str = "config.json", has_lm_head: bool = False) -> T5Config:
    """The T5Config a config.json describes, each value checked (sizes are checked against the tensors by
    ``check_t5_checkpoint``). ``has_lm_head``: the checkpoint stores its own output layer."""
    if not isinstance(cfg, dict):
        raise WeightsError(path, "expected an object of model settings")
    model_type = cfg.get("model_type")
    if model_type in REFUSED:
        raise WeightsError(path, f"model_type {model_type!r}: {REFUSED[model_type]}")
    if model_type not in T5_ARCHITECTURES:
        raise WeightsError(path, f"unsupported encoder-decoder model_type {show(model_type)} "
                                 f"(supported: {', '.join(T5_ARCHITECTURES)})")
    if cfg.get("quantization_config") is not None:
        raise WeightsError(path, "quantization_config: quantized T5 checkpoints are not supported (loom runs T5 "
                                 "dense, fp32 or bf16)")
    default = DEFAULTS[model_type]
    activation, gated = _feed_forward(cfg.get("feed_forward_proj", default["feed_forward_proj"]), path)
    layers = _int(cfg, "num_layers", path, default["num_layers"], high=MAX_LAYERS)
    buckets = _int(cfg, "relative_attention_num_buckets", path, 32, low=4)
    scale = cfg.get("scale_decoder_outputs")
    if scale is None:
        scale = cfg.get("tie_word_embeddings", True) is not False
    elif not isinstance(scale, bool):
        raise WeightsError(path, f"scale_decoder_outputs is {show(scale)}; expected true or false")
    if model_type == "mt5":
        scale = False  # transformers' MT5ForConditionalGeneration never rescales
    pad = _token_id(cfg, "pad_token_id", path, 0)
    start = _token_id(cfg, "decoder_start_token_id", path, None)
    if start is None:  # as transformers' generate: the BOS token, else (T5's convention) the padding token
        start = _token_id(cfg, "bos_token_id", path, pad)
    eos = cfg.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_ids):
        raise WeightsError(path, f"eos_token_id is {show(eos)}; expected a token id or a list of them")
    try:
        return T5Config(
            vocab_size=_int(cfg, "vocab_size", path, default["vocab_size"]),
            d_model=_int(cfg, "d_model", path, default["d_model"]), d_kv=_int(cfg, "d_kv", path, default["d_kv"]),
            d_ff=_int(cfg, "d_ff", path, default["d_ff"]), num_heads=_int(cfg, "num_heads", path, default["num_heads"]),
            num_encoder_layers=layers,
            num_decoder_layers=_int(cfg, "num_decoder_layers", path, layers, high=MAX_LAYERS),
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=_int(cfg, "relative_attention_max_distance", path, 128),
            norm_eps=checked_number(cfg.get("layer_norm_epsilon", 1e-6), "layer_norm_epsilon", path, low=0),
            activation=activation, gated_mlp=gated, tie_word_embeddings=not has_lm_head,
            scale_decoder_outputs=scale, decoder_start_token_id=start, pad_token_id=pad, eos_token_ids=eos_ids,
            max_position_embeddings=_int(cfg, "n_positions", path, 512, high=MAX_POSITIONS),
            architecture=model_type, name=str(cfg.get("_name_or_path", "")))
    except ValueError as e:
        raise WeightsError(path, str(e)) from None


def _embedding_name(ckpt: Checkpoint) -> str:
    """The shared embedding's stored name (``shared.weight``; some conversions keep only the stacks' copies)."""
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in ckpt:
            return name
    return "shared.weight"  # missing: reading it names it


def t5_tensor_sources(config: T5Config, ckpt: Checkpoint) -> dict[str, list[str]]:
    """loom parameter -> the stored tensors it is made of (q, k, v / k, v / gate, up concatenated by rows)."""
    src: dict[str, list[str]] = {"shared.weight": [_embedding_name(ckpt)]}
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["lm_head.weight"]
    mlp = ["mlp.gate_up_proj.weight"] if config.gated_mlp else ["mlp.up_proj.weight"]
    inputs = ["wi_0", "wi_1"] if config.gated_mlp else ["wi"]
    for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        src[f"{stack}.relative_bias.weight"] = [f"{stack}.{_RELATIVE_BIAS}"]
        src[f"{stack}.norm.weight"] = [f"{stack}.final_layer_norm.weight"]
        ff = 2 if stack == "decoder" else 1  # the feed-forward sublayer's index in the block
        for i in range(n):
            h, p = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
            src[p + "attn_norm.weight"] = [h + "0.layer_norm.weight"]
            src[p + "qkv_proj.weight"] = [h + f"0.SelfAttention.{x}.weight" for x in "qkv"]
            src[p + "o_proj.weight"] = [h + "0.SelfAttention.o.weight"]
            if stack == "decoder":
                src[p + "cross_norm.weight"] = [h + "1.layer_norm.weight"]
                src[p + "cross_q_proj.weight"] = [h + "1.EncDecAttention.q.weight"]
                src[p + "cross_kv_proj.weight"] = [h + f"1.EncDecAttention.{x}.weight" for x in "kv"]
                src[p + "cross_o_proj.weight"] = [h + "1.EncDecAttention.o.weight"]
            src[p + "mlp_norm.weight"] = [h + f"{ff}.layer_norm.weight"]
            src[p + mlp[0]] = [h + f"{ff}.DenseReluDense.{x}.weight" for x in inputs]
            src[p + "mlp.down_proj.weight"] = [h + f"{ff}.DenseReluDense.wo.weight"]
    return src


def _part_shapes(config: T5Config, parameter: str) -> list[tuple[int, ...]]:
    d, inner, f, v = config.d_model, config.inner_size, config.d_ff, config.vocab_size
    name = parameter.split(".", 3)[3] if ".layers." in parameter else parameter.split(".", 1)[-1]
    shapes: dict[str, list[tuple[int, ...]]] = {
        "weight": [(v, d)],  # shared.weight, lm_head.weight
        "relative_bias.weight": [(config.relative_attention_num_buckets, config.num_heads)],
        "norm.weight": [(d,)], "attn_norm.weight": [(d,)], "cross_norm.weight": [(d,)], "mlp_norm.weight": [(d,)],
        "qkv_proj.weight": [(inner, d)] * 3, "o_proj.weight": [(d, inner)], "cross_q_proj.weight": [(inner, d)],
        "cross_kv_proj.weight": [(inner, d)] * 2, "cross_o_proj.weight": [(d, inner)],
        "mlp.gate_up_proj.weight": [(f, d)] * 2, "mlp.up_proj.weight": [(f, d)], "mlp.down_proj.weight": [(d, f)],
    }
    return shapes[name]


def check_t5_checkpoint(config: T5Config, ckpt: Checkpoint, sources: dict[str, list[str]], path: str) -> None:
    """The config agrees with the checkpoint: num_layers / num_decoder_layers are the numbers of blocks stored,
    only the first block of each stack has a relative position table, and every tensor has the config's shape;
    checked before the model is allocated."""
    names = set(ckpt.weight_map)
    check_layer_count(config.num_encoder_layers, layer_indices(names, "encoder.block."), "num_layers", "encoder.block.",
                      path)
    check_layer_count(config.num_decoder_layers, layer_indices(names, "decoder.block."), "num_decoder_layers",
                      "decoder.block.", path)
    for name in sorted(names):
        # the first block's own table only (decoder.block.0.layer.1.EncDecAttention's, in old files, is unused)
        if name.endswith("SelfAttention.relative_attention_bias.weight") and ".block.0." not in name:
            raise WeightsError(path, "a relative position table in a block other than the first: per-layer tables "
                                     "(umt5) are not implemented", name)
    for parameter, parts in sources.items():
        for name, want in zip(parts, _part_shapes(config, parameter)):
            stored = tuple(ckpt.shape(name))
            if stored != want:
                raise WeightsError(path, f"shape {stored} does not match the config's {want}", name)


@dataclass
class LoadedT5:
    model: T5
    config: T5Config
    path: str
    load_seconds: float


def load_t5(folder: str, dtype: str | torch.dtype = torch.float32,
            device: str | torch.device | None = None) -> LoadedT5:
    """A T5 built from an HF folder (config.json + safetensors or pytorch_model.bin), in ``dtype`` on ``device``."""
    t0 = time.perf_counter()
    path = os.path.join(folder, "config.json")
    cfg = _read_json(path, WeightsError(folder, "no config.json in the folder"))
    if isinstance(cfg, dict) and cfg.get("model_type") in REFUSED:  # before the tensors are opened
        t5_config_from_hf(cfg, path)
    ckpt = open_encoder_checkpoint(folder)
    config = t5_config_from_hf(cfg, path, has_lm_head="lm_head.weight" in ckpt)
    sources = t5_tensor_sources(config, ckpt)
    check_t5_checkpoint(config, ckpt, sources, folder)
    model = fill_and_place(T5(config, dtype=resolve_dtype(dtype)), ckpt, sources, folder, device)
    return LoadedT5(model, config, folder, time.perf_counter() - t0)
