"""Hugging Face checkpoints: config.json -> ModelConfig, and safetensors shards -> tensors.

Each ``model_type`` loom runs is an ``HFFamily`` in ``HF_FAMILIES``: how its config.json becomes a
ModelConfig, which stored tensors make each loom parameter, and where its layers' tensors live. The
Llama-shaped decoders are here: llama, mistral, qwen2 (RMSNorm, SwiGLU, rotate-half RoPE; Qwen2 adds
q/k/v biases; Mistral and Qwen2 may use sliding windows). Other families register themselves from
their own modules (``register_family``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors import safe_open

from loom.config import MAX_CONTEXT, ROPE_SCALING_KINDS, ModelConfig, RopeScaling, scaled_context
from loom.weights.errors import WeightsError
from loom.weights.validate import (MAX_LAYERS, MAX_ROPE_BASE, Shape, check_layer_count, check_scaled_context,
                                   check_tensor_shapes, checked_int, checked_number, layer_indices, show)

LLAMA_SHAPED = ("llama", "mistral", "qwen2")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


_REQUIRED = object()
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _int(cfg: dict[str, Any], key: str, path: str, default: Any = _REQUIRED, low: int = 1,
         high: int | None = None) -> Any:
    """``cfg[key]`` checked to be an integer in [low, high]; a missing or null optional key is ``default``."""
    if cfg.get(key) is None and default is not _REQUIRED:
        return default
    if key not in cfg:
        raise WeightsError(path, f"config is missing {key!r}")
    return checked_int(cfg[key], key, path, low, high)


def _object(cfg: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """``cfg[key]`` when it is a JSON object; {} when it is missing or null."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WeightsError(path, f"{key} is {show(value)}; expected an object (or null)")
    return value


def _rope_settings(cfg: dict[str, Any], max_pos: int, path: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either the classic keys or transformers 5's ``rope_parameters``.

    ``rope_scaling`` spells the kind "type" (older configs) or "rope_type"; YaRN reads its optional
    beta_fast / beta_slow / attention_factor / truncate and, as transformers does, takes
    factor = max_position_embeddings / original_max_position_embeddings when no factor is given.
    """
    params = _object(cfg, "rope_parameters", path)
    scaling = _object(cfg, "rope_scaling", path)
    where = "rope_scaling"
    if "rope_type" in params and not scaling:
        scaling, where = params, "rope_parameters"
    theta = checked_number(params.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta", path,
                           above=1, high=MAX_ROPE_BASE)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind not in ROPE_SCALING_KINDS:
        raise ValueError(f"unsupported rope scaling type {show(kind)} (supported: {', '.join(ROPE_SCALING_KINDS)})")
    unsupported = [k for k in ("mscale", "mscale_all_dim") if scaling.get(k)]
    if unsupported:
        raise ValueError(f"rope scaling parameters {unsupported} are not supported")
    original = scaling.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    original = checked_int(original or 0, f"{where}.original_max_position_embeddings", path, 0, MAX_CONTEXT) or None
    factor = scaling.get("factor")
    if factor is None:
        if kind != "yarn" or not original:
            raise ValueError(f"rope scaling {kind!r} needs a factor")
        factor = max_pos / original
    attention = scaling.get("attention_factor")

    def positive(key: str, default: float) -> float:
        return checked_number(scaling.get(key) or default, f"{where}.{key}", path, above=0)

    return theta, RopeScaling(
        kind=kind, factor=checked_number(factor, f"{where}.factor", path, above=0), original_max_position=original,
        beta_fast=positive("beta_fast", 32.0), beta_slow=positive("beta_slow", 1.0),
        attention_factor=checked_number(attention, f"{where}.attention_factor", path, above=0)
        if attention is not None else None,
        truncate=bool(scaling.get("truncate", True)))


def _head_dim(cfg: dict[str, Any], hidden: int, n_heads: int, path: str) -> int:
    """``head_dim``, else hidden_size / num_attention_heads, which must then divide evenly."""
    head_dim = _int(cfg, "head_dim", path, None)
    if head_dim is not None:
        return head_dim
    if hidden % n_heads:
        raise WeightsError(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {n_heads} "
                                 "(and head_dim is not given)")
    return hidden // n_heads


def _window_layers(cfg: dict[str, Any], n_layers: int, path: str) -> tuple[bool, ...]:
    """Which layers of a Qwen2 model use its sliding window: ``layer_types``, else layers from max_window_layers on."""
    types = cfg.get("layer_types")
    if types:
        if not isinstance(types, list) or len(types) != n_layers:
            raise WeightsError(path, f"layer_types is {show(types)}; expected a list of {n_layers} layer types "
                                     "(one per layer)")
        return tuple(t == "sliding_attention" for t in types)
    first = _int(cfg, "max_window_layers", path, 0, low=0)
    return tuple(i >= first for i in range(n_layers))


@dataclass(frozen=True)
class HFFamily:
    """How loom reads one ``model_type``: ``config`` turns the (object-checked) config.json into a
    ModelConfig (a ValueError or TypeError becomes a WeightsError naming the file), ``sources`` maps each
    loom parameter to the stored tensors concatenated along rows to make it (``hf_tensor_sources``), and
    ``layer_prefix`` is where the stored layers are numbered (``{prefix}N.``). ``transform`` (optional)
    rewrites a stored tensor as it is read (e.g. GPT-2's Conv1D weights are stored transposed); it must
    work on meta tensors (shapes are checked through it) and leave a tensor of an unexpected shape as it
    is (the shape check then names it). ``base_prefix``: the causal-LM wrapper's name for its base model
    (GPT-2's "transformer."); a checkpoint saved from the base model alone, as the original GPT-2, OPT
    and BLOOM uploads are, stores those tensors without it, and its names resolve either way.
    ``layers_key``: config.json's name for the layer count (in messages)."""

    config: Callable[[dict[str, Any], str], ModelConfig]
    sources: Callable[[ModelConfig], dict[str, list[str]]]
    layer_prefix: str = "model.layers."
    transform: Callable[[ModelConfig, str, torch.Tensor], torch.Tensor] | None = None
    base_prefix: str = ""
    layers_key: str = "num_hidden_layers"


HF_FAMILIES: dict[str, HFFamily] = {}


def register_family(model_types: tuple[str, ...], family: HFFamily) -> None:
    for t in model_types:
        HF_FAMILIES[t] = family


def family_of(config: ModelConfig) -> HFFamily:
    family = HF_FAMILIES.get(config.architecture)
    if family is None:
        raise ValueError(f"no Hugging Face layout for architecture {config.architecture!r} "
                         f"(supported: {', '.join(sorted(HF_FAMILIES))})")
    return family


def config_from_hf(cfg: Any, path: str = "config.json") -> ModelConfig:
    """The ModelConfig a config.json describes, each value checked to be a number within its bounds (the
    layer count and sizes are checked against the checkpoint's tensors by ``check_hf_checkpoint``)."""
    if not isinstance(cfg, dict):
        raise WeightsError(path, f"the file holds {_JSON_TYPES.get(type(cfg), type(cfg).__name__)}; "
                                 "expected an object of model settings")
    model_type = cfg.get("model_type")
    family = HF_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise WeightsError(path, f"unsupported model_type {show(model_type)} "
                                 f"(supported: {', '.join(sorted(HF_FAMILIES))})")
    try:
        return family.config(cfg, path)
    except WeightsError:
        raise
    except (ValueError, TypeError) as e:
        raise WeightsError(path, str(e)) from None


def _llama_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    """Llama, Mistral and Qwen2 configs."""
    model_type = cfg["model_type"]
    hidden, n_heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    n_layers = _int(cfg, "num_hidden_layers", path, high=MAX_LAYERS)
    max_pos = _int(cfg, "max_position_embeddings", path, 2048, high=MAX_CONTEXT)
    theta, scaling = _rope_settings(cfg, max_pos, path)
    max_pos, scaling = scaled_context(max_pos, scaling)
    check_scaled_context(max_pos, "the rope scaling factor", path)
    head_dim = _head_dim(cfg, hidden, n_heads, path)
    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise WeightsError(path, f"unsupported hidden_act {show(act)}")
    window = _int(cfg, "sliding_window", path, None, low=0) or None
    window_layers = None
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window", False):
            window = None
        elif window:
            window_layers = _window_layers(cfg, n_layers, path)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=_int(cfg, "num_key_value_heads", path, n_heads),
        head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size", path),
        activation=_ACTIVATIONS[act],
        norm_eps=checked_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", path, low=0),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        attn_out_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=window,
        sliding_window_layers=window_layers,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        architecture=model_type,
        name=str(cfg.get("_name_or_path", "")),
    )


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The config.json that ``config_from_hf`` reads back as ``config`` (Llama-shaped models)."""
    if config.architecture not in LLAMA_SHAPED:
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


def _read_json(path: str, missing: WeightsError) -> Any:
    """The JSON value in ``path``; ``missing`` is raised if there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise missing from None
    except OSError as e:
        raise WeightsError(path, f"cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(path, f"invalid JSON: {e}") from None


def read_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    return config_from_hf(_read_json(path, WeightsError(folder, "no config.json in the folder")), path)


def _read_index(path: str) -> dict[str, str]:
    """The weight_map (tensor name -> shard file) of a model.safetensors.index.json."""
    index = _read_json(path, WeightsError(path, "no such file"))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(path, f"weight_map is {show(weight_map)}; expected an object mapping each tensor name "
                                 "to its shard file")
    return weight_map


@dataclass(frozen=True)
class TensorLocation:
    """Where a stored tensor's bytes are: ``nbytes`` from byte ``offset`` of ``path``; for a safetensors tensor
    also its dtype (the header's name, e.g. "BF16") and shape (a GGUF tensor's are in the file's header)."""

    path: str
    offset: int
    nbytes: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


class SafetensorsCheckpoint:
    """Tensors of one or many safetensors shards (with model.safetensors.index.json).

    ``base_prefix`` (a family's, see ``HFFamily``): when no stored name starts with it, the checkpoint
    holds a bare base model, and a name ``{base_prefix}X`` is read as the stored ``X`` (``stripped`` is
    then the prefix)."""

    def __init__(self, folder: str, base_prefix: str = "") -> None:
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = _read_index(index)
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
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # shard -> (data start, header), as read
        self.stripped = ""
        if base_prefix and weight_map and not any(n.startswith(base_prefix) for n in weight_map):
            self.stripped = base_prefix

    def stored_name(self, name: str) -> str:
        """The name ``name`` is stored under (without the base prefix in a bare base-model checkpoint)."""
        if self.stripped and name.startswith(self.stripped) and name not in self.weight_map:
            return name[len(self.stripped):]
        return name

    def __contains__(self, name: str) -> bool:
        return self.stored_name(name) in self.weight_map

    def _fname(self, name: str) -> tuple[str, str]:
        stored = self.stored_name(name)
        fname = self.weight_map.get(stored)
        if fname is None:
            raise WeightsError(self.folder, "tensor is missing from the checkpoint", stored)
        return fname, stored

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, read from its shard's header (no data is read)."""
        fname, stored = self._fname(name)
        try:
            return tuple(self._handles[fname].get_slice(stored).get_shape())
        except Exception as e:
            raise WeightsError(os.path.join(self.folder, fname), f"cannot read tensor: {e}", stored) from None

    def location(self, name: str) -> TensorLocation:
        """The tensor's bytes in its shard, from the shard's header (safetensors: an 8-byte little-endian
        header size, the JSON header, then the data; each tensor's ``data_offsets`` count from the data)."""
        fname, stored = self._fname(name)
        path = os.path.join(self.folder, fname)
        header = self._headers.get(fname)
        if header is None:
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = (8 + size, json.loads(f.read(size)))
            self._headers[fname] = header
        start, entries = header
        entry = entries.get(stored)
        if entry is None:
            raise WeightsError(path, "tensor is missing from the shard's header", stored)
        begin, end = entry["data_offsets"]
        return TensorLocation(path, start + begin, end - begin, entry["dtype"], tuple(entry["shape"]))

    def tensor(self, name: str) -> torch.Tensor:
        fname, stored = self._fname(name)
        try:
            return self._handles[fname].get_tensor(stored)
        except Exception as e:
            raise WeightsError(os.path.join(self.folder, fname), f"cannot read tensor: {e}", stored) from None


def check_hf_checkpoint(config: ModelConfig, ckpt: SafetensorsCheckpoint,
                        shape_of: Callable[[str], Shape] | None = None) -> None:
    """The config agrees with the checkpoint: num_hidden_layers is the number of layers stored, and every
    tensor the model is built from has the config's shape (``shape_of``: how a stored tensor's shape is
    read, by default ``ckpt.shape``)."""
    path = os.path.join(ckpt.folder, "config.json")
    family = family_of(config)
    prefix = family.layer_prefix
    if ckpt.stripped and prefix.startswith(ckpt.stripped):
        prefix = prefix[len(ckpt.stripped):]
    present = layer_indices(ckpt.weight_map, prefix)
    # DeepSeek-V3's multi-token-prediction layers follow the decoder's (num_nextn_predict_layers): not run, not read
    present -= set(range(config.num_layers, config.num_layers + config.unused_stored_layers))
    check_layer_count(config.num_layers, present, family.layers_key, prefix, path)
    shape_of = shape_of or ckpt.shape
    if family.transform is not None:
        stored_shape_of = shape_of

        def shape_of(name: str) -> Shape:  # the shape the tensor has once read (the transform on a meta tensor)
            shape = tuple(stored_shape_of(name))
            if any(s is None for s in shape):
                return shape
            return tuple(family.transform(config, name, torch.empty(shape, device="meta")).shape)
    check_tensor_shapes(config, hf_tensor_sources(config, ckpt), shape_of, ckpt.folder)


def hf_tensor_sources(config: ModelConfig, checkpoint: SafetensorsCheckpoint | None = None) -> dict[str, list[str]]:
    """loom parameter name -> HF tensor names concatenated (along rows) to make it. One name for a fused
    parameter (q|k|v) is a tensor stored fused (GPT-2's c_attn, BLOOM's query_key_value)."""
    return family_of(config).sources(config)


def read_hf_tensor(config: ModelConfig, ckpt: SafetensorsCheckpoint, name: str,
                   stored: Callable[[str], torch.Tensor] | None = None) -> torch.Tensor:
    """A stored tensor as fp32, in the layout loom's parameters take (the family's ``transform``).
    ``stored``: how the stored tensor is read, by default ``ckpt.tensor`` (a LoRA adapter's deltas are
    merged there, in the stored layout)."""
    t = (stored or ckpt.tensor)(name).float()
    transform = family_of(config).transform
    return t if transform is None else transform(config, name, t)


def _llama_sources(config: ModelConfig) -> dict[str, list[str]]:
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


register_family(LLAMA_SHAPED, HFFamily(_llama_config, _llama_sources))

# Families in their own modules register themselves on import (they import the helpers above).
import loom.weights.hf_gemma  # noqa: E402,F401
from loom.weights import hf_classic  # noqa: E402,F401  (GPT-2, OPT, BLOOM)
from loom.weights import hf_moe  # noqa: E402,F401  (mixtral, qwen2_moe, qwen3_moe, olmoe)
from loom.weights import hf_deepseek  # noqa: E402,F401  (deepseek_v2, deepseek_v3: latent attention)
