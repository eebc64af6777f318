"""Hugging Face encoder checkpoints (``model_type: bert``): config.json -> EncoderConfig, the tensors of
model.safetensors (sharded or not) or pytorch_model.bin -> an ``Encoder``, and the sentence-transformers
files that say how its states become an embedding.

A sentence-transformers folder is an HF model plus ``modules.json`` (the pipeline: Transformer -> Pooling
-> Normalize), ``1_Pooling/config.json`` (which pooling) and ``sentence_bert_config.json`` (the longest
input, ``max_seq_length``). A folder without them pools by mean without normalizing, as
sentence-transformers does for a plain HF model. Every check names the file (and tensor) at fault.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from loom.layers.pooling import EmbeddingSpec, PoolingConfig
from loom.models.encoder import Encoder, EncoderConfig
from loom.weights.errors import WeightsError
from loom.weights.hf import _ACTIVATIONS, _int, _read_json, SafetensorsCheckpoint
from loom.layers.linear import pack_bf16_linears
from loom.weights.loader import fill_parameters, resolve_dtype
from loom.weights.validate import MAX_LAYERS, check_layer_count, checked_number, layer_indices, show

ENCODER_ARCHITECTURES = ("bert",)
MAX_POSITIONS = 1 << 16  # far above any BERT-style model's (512 to 8,192)
# sentence-transformers' pooling flags -> loom's pooling modes (the others are refused by name)
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last",
                  "pooling_mode_max_tokens": None, "pooling_mode_mean_sqrt_len_tokens": None,
                  "pooling_mode_weightedmean_tokens": None}
_POOLING_NAMES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}


def is_encoder_folder(path: str) -> bool:
    """Whether ``path`` is a folder whose config.json names an encoder architecture loom runs (a malformed
    config.json is not: the decoder loader reports it)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in ENCODER_ARCHITECTURES


def encoder_config_from_hf(cfg: Any, path: str = "config.json") -> EncoderConfig:
    """The EncoderConfig a BERT config.json describes, each value checked (the sizes are checked against
    the tensors by ``check_encoder_checkpoint``)."""
    if not isinstance(cfg, dict):
        raise WeightsError(path, "expected an object of model settings")
    if cfg.get("model_type") not in ENCODER_ARCHITECTURES:
        raise WeightsError(path, f"unsupported encoder model_type {show(cfg.get('model_type'))} "
                                 f"(supported: {', '.join(ENCODER_ARCHITECTURES)})")
    position = cfg.get("position_embedding_type", "absolute")
    if position not in ("absolute", None):
        raise WeightsError(path, f"position_embedding_type {show(position)} is not supported (loom runs absolute "
                                 "learned positions)")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise WeightsError(path, "a BERT decoder (is_decoder / add_cross_attention) is not supported")
    act = cfg.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise WeightsError(path, f"unsupported hidden_act {show(act)}")
    hidden, heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    if hidden % heads:
        raise WeightsError(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return EncoderConfig(
        vocab_size=_int(cfg, "vocab_size", path), hidden_size=hidden,
        num_layers=_int(cfg, "num_hidden_layers", path, high=MAX_LAYERS), num_heads=heads,
        intermediate_size=_int(cfg, "intermediate_size", path),
        max_position_embeddings=_int(cfg, "max_position_embeddings", path, 512, high=MAX_POSITIONS),
        type_vocab_size=_int(cfg, "type_vocab_size", path, 2),
        norm_eps=checked_number(cfg.get("layer_norm_eps", 1e-12), "layer_norm_eps", path, low=0),
        activation=_ACTIVATIONS[act], pad_token_id=_int(cfg, "pad_token_id", path, 0, low=0),
        architecture=cfg["model_type"], name=str(cfg.get("_name_or_path", "")))


class TorchCheckpoint:
    """The tensors of a ``pytorch_model.bin`` (read with ``weights_only``: no code in the file runs)."""

    def __init__(self, path: str) -> None:
        self.folder, self.path = os.path.dirname(path), path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle and zip errors have many types
            raise WeightsError(path, f"cannot read the PyTorch checkpoint: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(path, "expected a state dict (tensor names -> tensors)")
        self.state: dict[str, torch.Tensor] = state
        self.weight_map = {name: os.path.basename(path) for name in state}

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensor(name).shape)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise WeightsError(self.path, "tensor is missing from the checkpoint", name)
        return self.state[name]


Checkpoint = SafetensorsCheckpoint | TorchCheckpoint


def open_encoder_checkpoint(folder: str) -> Checkpoint:
    """The folder's safetensors shards if it has any, else its pytorch_model.bin."""
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return SafetensorsCheckpoint(folder)
    if "pytorch_model.bin" in names:
        return TorchCheckpoint(os.path.join(folder, "pytorch_model.bin"))
    raise WeightsError(folder, "no model.safetensors or pytorch_model.bin in the folder")


def _prefix(ckpt: Checkpoint) -> str:
    """"bert." for a checkpoint saved from a task model (BertForMaskedLM, ...), "" for a bare BertModel."""
    return "bert." if "bert.embeddings.word_embeddings.weight" in ckpt else ""


def encoder_tensor_sources(config: EncoderConfig, ckpt: Checkpoint) -> dict[str, list[str]]:
    """loom parameter -> the stored tensors it is made of (q, k, v concatenated by rows)."""
    p = _prefix(ckpt)

    def norm(stem: str) -> dict[str, str]:
        # Checkpoints from the original TensorFlow release name LayerNorm's parameters gamma / beta.
        old = f"{p}{stem}.gamma" in ckpt
        return {"weight": f"{p}{stem}.{'gamma' if old else 'weight'}", "bias": f"{p}{stem}.{'beta' if old else 'bias'}"}

    src: dict[str, list[str]] = {
        "word_embeddings": [p + "embeddings.word_embeddings.weight"],
        "position_embeddings": [p + "embeddings.position_embeddings.weight"],
        "token_type_embeddings": [p + "embeddings.token_type_embeddings.weight"],
    }
    src.update({f"embed_norm.{k}": [v] for k, v in norm("embeddings.LayerNorm").items()})
    for i in range(config.num_layers):
        theirs, ours = f"encoder.layer.{i}.", f"layers.{i}."
        h = p + theirs
        for s in ("weight", "bias"):
            src[ours + f"qkv_proj.{s}"] = [h + f"attention.self.{x}.{s}" for x in ("query", "key", "value")]
            src[ours + f"o_proj.{s}"] = [h + f"attention.output.dense.{s}"]
            src[ours + f"up_proj.{s}"] = [h + f"intermediate.dense.{s}"]
            src[ours + f"down_proj.{s}"] = [h + f"output.dense.{s}"]
        src.update({ours + f"attn_norm.{k}": [v] for k, v in norm(theirs + "attention.output.LayerNorm").items()})
        src.update({ours + f"mlp_norm.{k}": [v] for k, v in norm(theirs + "output.LayerNorm").items()})
    return src


def parameter_shapes(config: EncoderConfig) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of the stored parts of each loom parameter, by the parameter's name without ``layers.N.``."""
    h, f = config.hidden_size, config.intermediate_size
    return {"word_embeddings": [(config.vocab_size, h)], "position_embeddings": [(config.max_position_embeddings, h)],
            "token_type_embeddings": [(config.type_vocab_size, h)], "qkv_proj.weight": [(h, h)] * 3,
            "qkv_proj.bias": [(h,)] * 3, "o_proj.weight": [(h, h)], "o_proj.bias": [(h,)],
            "up_proj.weight": [(f, h)], "up_proj.bias": [(f,)], "down_proj.weight": [(h, f)],
            "down_proj.bias": [(h,)], "norm.weight": [(h,)], "norm.bias": [(h,)]}


def check_encoder_checkpoint(config: EncoderConfig, ckpt: Checkpoint, sources: dict[str, list[str]],
                             path: str) -> None:
    """num_hidden_layers is the number of layers stored, and every tensor has the config's shape; checked
    before the model is allocated, so its sizes are ones the file's tensors have."""
    p = _prefix(ckpt)
    check_layer_count(config.num_layers, layer_indices(ckpt.weight_map, p + "encoder.layer."), "num_hidden_layers",
                      p + "encoder.layer.", path)
    shapes = parameter_shapes(config)
    for parameter, parts in sources.items():
        key = parameter.split(".", 2)[2] if parameter.startswith("layers.") else parameter
        wanted = shapes["norm." + key.split(".")[-1]] if "norm" in key else shapes[key]
        for name, want in zip(parts, wanted):
            stored = ckpt.shape(name)
            if stored != want:
                raise WeightsError(path, f"shape {stored} does not match the config's {want}", name)


def _pooling_from_config(cfg: Any, path: str) -> str:
    """The one pooling mode a sentence-transformers Pooling config.json asks for."""
    if not isinstance(cfg, dict):
        raise WeightsError(path, "expected an object of pooling settings")
    if "pooling_mode" in cfg:  # newer sentence-transformers spell the mode out
        mode = cfg["pooling_mode"]
        if mode not in _POOLING_NAMES:
            raise WeightsError(path, f"pooling_mode {show(mode)} is not supported (loom pools by mean, cls or "
                                     "lasttoken)")
        return _POOLING_NAMES[mode]
    chosen = [key for key in _POOLING_FLAGS if cfg.get(key)]
    if len(chosen) != 1:
        raise WeightsError(path, f"expected exactly one pooling_mode_* flag set, got {chosen or 'none'} (several "
                                 "modes concatenate their vectors, which loom does not do)")
    mode = _POOLING_FLAGS[chosen[0]]
    if mode is None:
        raise WeightsError(path, f"{chosen[0]} is not supported (loom pools by mean, cls or last token)")
    return mode


def read_pooling(folder: str, hidden_size: int) -> PoolingConfig:
    """The pooling a sentence-transformers folder's modules.json names (mean, unnormalized, without one).
    Modules that change the vector in ways loom does not run (Dense, LayerNorm, ...) are refused by name:
    skipping them would give other embeddings than the model's."""
    path = os.path.join(folder, "modules.json")
    if not os.path.exists(path):
        return PoolingConfig("mean", normalize=False)
    modules = _read_json(path, WeightsError(path, "no such file"))
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                for m in modules):
        raise WeightsError(path, "expected a list of modules, each an object with a type")
    mode, normalize = "mean", False
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            sub = os.path.join(folder, str(module.get("path", "")), "config.json")
            cfg = _read_json(sub, WeightsError(sub, "the Pooling module's config.json is missing"))
            mode = _pooling_from_config(cfg, sub)
            dim = cfg.get("word_embedding_dimension", hidden_size)
            if dim != hidden_size:
                raise WeightsError(sub, f"word_embedding_dimension {show(dim)} is not the model's hidden_size "
                                        f"{hidden_size}")
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise WeightsError(path, f"the sentence-transformers module {module['type']!r} is not supported "
                                     "(loom runs Transformer, Pooling and Normalize)")
    return PoolingConfig(mode, normalize)


def _max_tokens(folder: str, config: EncoderConfig) -> int:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length, at most the model's
    positions."""
    limit = config.max_position_embeddings
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            cfg = _read_json(path, WeightsError(path, "no such file"))
            value = cfg.get(key) if isinstance(cfg, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return min(value, limit)
    return limit


def _matryoshka(cfg: dict[str, Any], config: EncoderConfig, path: str) -> tuple[int, ...] | None:
    """The embedding sizes config.json declares the model was trained for (vLLM's ``matryoshka_dimensions`` /
    ``is_matryoshka``); None when it declares none."""
    dims = cfg.get("matryoshka_dimensions")
    if dims is not None:
        if not isinstance(dims, list) or not all(isinstance(d, int) and 1 <= d <= config.hidden_size for d in dims):
            raise WeightsError(path, f"matryoshka_dimensions is {show(dims)}; expected a list of sizes from 1 to "
                                     f"{config.hidden_size}")
        return tuple(dims)
    return () if cfg.get("is_matryoshka") is True else None


def read_embedding_spec(folder: str, config: EncoderConfig, cfg: dict[str, Any]) -> EmbeddingSpec:
    """How the folder's model embeds: pooling, normalization, the longest input, Matryoshka sizes."""
    return EmbeddingSpec(read_pooling(folder, config.hidden_size), _max_tokens(folder, config), config.hidden_size,
                         _matryoshka(cfg, config, os.path.join(folder, "config.json")))


@dataclass
class LoadedEncoder:
    model: Encoder
    config: EncoderConfig
    spec: EmbeddingSpec
    path: str
    load_seconds: float


def load_encoder(folder: str, dtype: str | torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> LoadedEncoder:
    """An Encoder built from an HF folder (config.json + safetensors or pytorch_model.bin), in ``dtype`` on
    ``device``, with how it embeds (``read_embedding_spec``)."""
    t0 = time.perf_counter()
    path = os.path.join(folder, "config.json")
    cfg = _read_json(path, WeightsError(folder, "no config.json in the folder"))
    config = encoder_config_from_hf(cfg, path)
    spec = read_embedding_spec(folder, config, cfg)
    ckpt = open_encoder_checkpoint(folder)
    sources = encoder_tensor_sources(config, ckpt)
    check_encoder_checkpoint(config, ckpt, sources, folder)
    model = fill_and_place(Encoder(config, dtype=resolve_dtype(dtype)), ckpt, sources, folder, device)
    return LoadedEncoder(model, config, spec, folder, time.perf_counter() - t0)


def fill_and_place(model: torch.nn.Module, ckpt: Checkpoint, sources: dict[str, list[str]], folder: str,
                   device: str | torch.device | None) -> torch.nn.Module:
    """``model`` filled from ``ckpt`` (fp32 reads, cast to the model's dtype), frozen, moved to ``device``; a bf16
    CPU model's linears packed once for oneDNN's GEMMs (the decoder's bf16 path; one copy)."""
    fetch: Callable[[str], torch.Tensor] = lambda name: ckpt.tensor(name).float()  # noqa: E731
    fill_parameters(model, sources, fetch, folder)  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    if device is not None and torch.device(device).type != "cpu":
        model.to(device)
    elif next(model.parameters()).dtype == torch.bfloat16:
        pack_bf16_linears(model)
    return model
