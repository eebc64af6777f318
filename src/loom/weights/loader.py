"""Load a model (and its tokenizer) from a GGUF file or a Hugging Face folder."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from loom.config import ModelConfig, RopeScalingOverride, with_rope_scaling
from loom.device import default_dtype, resolve_device
from loom.layers.linear import pack_bf16_linears
from loom.layers.quantized import (QuantizedEmbedding, QuantizedLinear, QuantizedTensor, onednn_int8_available,
                                   pack_w8a8_linears)
from loom.models.rotation import rotate
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.gguf import GGUFFile, TensorInfo, config_from_gguf, gguf_tensor_sources, read_gguf_tensor
from loom.weights.native import gguf_quantized
from loom.weights.lowrank_checkpoint import load_lowrank_linears, read_lowrank
from loom.weights.quantized_checkpoint import load_quantized_linears, read_quantization, stored_shape
from loom.weights.hf import (SafetensorsCheckpoint, TensorLocation, check_hf_checkpoint, family_of, hf_tensor_sources,
                             read_hf_config, read_hf_tensor)
from loom.weights.lora import read_lora

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    path: str
    format: str  # "gguf" or "hf"
    load_seconds: float
    metadata: dict[str, Any] | None = None  # GGUF metadata (the tokenizer is built from it)
    # Loaded without its decoder layers (``decoder_layers=False``): what builds them later (weights/streaming.py)
    layer_sources: LayerSources | None = None


@dataclass
class LayerSources:
    """What a model loaded without its decoder layers needs to build each of them later, exactly as
    ``load_model`` would have: the file (a parsed GGUF, its data no longer mapped, or the checkpoint's
    folder), which source tensors make each parameter, which linears run natively quantized, the rows of
    fused parameters, and the attention kernel."""

    path: str
    format: str  # "gguf" or "hf"
    config: ModelConfig
    dtype: torch.dtype
    native: bool
    sources: dict[str, list[str]]  # the decoder layers' parameters only
    row_splits: dict[str, list[int]]
    kernel: str
    gguf_tensors: dict[str, TensorInfo] | None = None
    locations: dict[str, TensorLocation] = field(default_factory=dict)  # each source tensor's bytes in its file


def fill_parameters(model: Transformer, sources: dict[str, list[str]], fetch: Callable[[str], torch.Tensor],
                    path: str, filled: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Set every parameter of ``model`` from the source tensors named in ``sources``.

    Fused parameters (qkv, gate+up) are the row-wise concatenation of their parts; each part's shape
    is checked against the slice it fills, so a mismatch names the offending tensor.
    """
    params = dict(model.named_parameters())
    missing = set(params) - set(sources) - set(filled)
    if missing:
        raise WeightsError(path, f"no source for parameters {sorted(missing)[:5]}")
    splits = model.fused_row_splits()
    for name, names in sources.items():
        param = params[name]
        param.data = source_tensor(tuple(param.shape), names, splits.get(name), fetch, path, model.dtype)


def source_tensor(shape: tuple[int, ...], names: list[str], row_splits: list[int] | None,
                  fetch: Callable[[str], torch.Tensor], path: str, dtype: torch.dtype) -> torch.Tensor:
    """A parameter of ``shape`` from its source tensors: one, or the row-wise concatenation of a fused
    parameter's parts (``row_splits``: their rows), each part's shape checked against its slice."""
    # one source for a fused parameter: stored fused (GPT-2's c_attn, BLOOM's query_key_value)
    rows = (row_splits or [shape[0]]) if len(names) > 1 else [shape[0]]
    parts = []
    for src, n in zip(names, rows):
        t = fetch(src)
        want = (n, *shape[1:])
        if tuple(t.shape) != want:
            raise WeightsError(path, f"shape {tuple(t.shape)} does not match the config's {want}", src)
        parts.append(t)
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return tensor.to(dtype).contiguous()


WEIGHTS = ("native", "fp32", "bf16", "int8")


def choose_weights(weights: str | None, dtype: str | torch.dtype | None,
                   device: str | torch.device | None = None, dense: bool = False) -> tuple[str | None, str | torch.dtype]:
    """(weights, dtype) for ``load_model`` from what a user gave: nothing means native (quantized files
    run quantized), or dense when ``dense`` (a LoRA adapter is merged into dense weights); a dtype alone
    means dense in that dtype. The dtype left unsaid is the device's default (fp32 on the CPU, bf16 on
    CUDA)."""
    fallback = default_dtype(resolve_device(device))
    if weights is None and dtype is None:
        return (None if dense else "native"), fallback
    return weights, dtype if dtype is not None else fallback


def load_model(path: str | os.PathLike[str], dtype: str | torch.dtype = torch.float32,
               kernel: str = "sdpa", weights: str | None = None,
               device: str | torch.device | None = None,
               rope_scaling: RopeScalingOverride = None, lora: str | os.PathLike[str] | None = None,
               decoder_layers: bool = True) -> LoadedModel:
    """Build a Transformer from ``path``: a .gguf file, or a folder with config.json + safetensors.

    ``weights``: "native" keeps quantized weights quantized (GGUF Q4_0 / Q4_1 / Q8_0 linears run on
    the int4 / int8 kernels, a loom-quantized checkpoint loads as saved) with the device's default
    dtype everywhere else (fp32 on the CPU, bf16 on CUDA); "fp32" / "bf16" dequantize everything to
    that dtype; "int8" rotates the residual stream and runs every decoder linear as W8A8 on the CPU's int8
    matrix units, bf16 elsewhere (``w8a8_model``). None means ``dtype`` (all dense). ``device``: "cpu" (default) or "cuda"; the model is
    built on the CPU and moved there, quantized linears are packed for that device's kernels.
    ``rope_scaling``: a RopeScaling replaces the file's RoPE scaling (and grows the context to the
    original context times the factor), "none" switches the file's off, None keeps it
    (``config.with_rope_scaling``); the rotary tables are built from the result. ``lora``: a PEFT LoRA
    adapter folder merged into the weights as they load (``weights/lora.py``; dense weights only).
    """
    path = os.fspath(path)
    dev = resolve_device(device)
    if weights is not None:
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
        # int8 is built in fp32: its rotation and quantization start from the file's values (see w8a8_model)
        dtype = {"native": default_dtype(dev), "fp32": torch.float32, "bf16": torch.bfloat16,
                 "int8": torch.float32}[weights]
        if weights == "int8":
            check_w8a8(dev)
    dtype = resolve_dtype(dtype)
    native = weights == "native"
    adapter = read_lora(lora) if lora is not None else None
    if not decoder_layers:
        check_streamable(path, weights, dev, adapter is not None)
    if adapter is not None and native:
        raise ValueError("a LoRA adapter is merged into dense weights: load the model with weights fp32 or bf16 "
                         "(--weights fp32), not native")
    t0 = time.perf_counter()
    if os.path.isdir(path):
        config, ckpt = open_hf_checkpoint(path)
        config = with_rope_scaling(config, rope_scaling)
        model = Transformer(config, dtype=dtype, kernel=kernel)
        sources = hf_tensor_sources(config, ckpt)
        layer_sources = None
        if not decoder_layers:
            sources, layer_sources = _unload_layers(model, sources, path, "hf", native, kernel)
            layer_sources.locations = {n: ckpt.location(n) for names in layer_sources.sources.values() for n in names}
        quant = read_quantization(path)
        filled: set[str] = set()
        if quant is not None:
            if adapter is not None:
                raise ValueError(f"{path} is a quantized checkpoint: merge the LoRA adapter into the dense model "
                                 "before quantizing it")
            sources, filled = load_quantized_linears(model, quant, sources, ckpt, dequantize=not native, device=dev)
        if read_lowrank(path) is not None:
            if adapter is not None or weights == "int8":
                raise ValueError(f"{path} is a low-rank factorized checkpoint: it loads with weights native, fp32 or "
                                 "bf16, without a LoRA adapter (merge the adapter before factorizing)")
            sources, factored = load_lowrank_linears(model, sources, ckpt)
            filled |= factored
        stored = None
        if adapter is not None:  # PEFT's deltas are in the stored layout: merged before the family's transform
            adapter.check_names({n for names in sources.values() for n in names})
            stored = adapter.merged(lambda n: ckpt.tensor(n).float())
        fetch = lambda n: read_hf_tensor(config, ckpt, n, stored)  # noqa: E731
        fill_parameters(model, sources, fetch, path, filled)
        fmt, metadata = "hf", None
    elif os.path.isfile(path):
        g = GGUFFile(path)
        try:
            config = with_rope_scaling(config_from_gguf(g), rope_scaling)
            model = Transformer(config, dtype=dtype, kernel=kernel)
            sources = gguf_tensor_sources(config)
            layer_sources = None
            if not decoder_layers:
                sources, layer_sources = _unload_layers(model, sources, path, "gguf", native, kernel)
                layer_sources.gguf_tensors = g.tensors  # types and shapes (not the metadata: the tokenizer's)
                layer_sources.locations = {n: TensorLocation(path, g.info(n).offset, g.info(n).nbytes)
                                           for names in layer_sources.sources.values() for n in names}
            filled: set[str] = set()
            if native:
                sources, filled = native_gguf_linears(model, g, sources, dev)
            fetch = lambda n: read_gguf_tensor(g, config, n)  # noqa: E731
            if adapter is not None:  # the adapter names HF weights: map GGUF names to them
                hf_names = {gn: hn for k, names in sources.items()
                            for gn, hn in zip(names, hf_tensor_sources(config, None).get(k, []))}
                adapter.check_names(set(hf_names.values()))
                fetch = adapter.merged(fetch, lambda n: hf_names.get(n, n))
            fill_parameters(model, sources, fetch, path, filled)
        finally:
            g.close()
        fmt, metadata = "gguf", g.metadata
    else:
        raise WeightsError(path, "no such file or folder")
    model.eval().requires_grad_(False)
    if weights == "int8":
        w8a8_model(model)
    if dev.type != "cpu":
        model.to(dev)
    elif model.dtype == torch.bfloat16:
        pack_bf16_linears(model)  # dense bf16 linears reordered once for oneDNN's GEMMs (one copy)
    return LoadedModel(model, config, path, fmt, time.perf_counter() - t0, metadata, layer_sources)


class UnloadedLayer(nn.Module):
    """The place of a decoder layer whose weights are not in memory (``load_model(decoder_layers=False)``)."""

    mlp = None  # no MoE to look into (Transformer.fused_row_splits)

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError(f"decoder layer {self.index} is not loaded: its weights stream from the model file "
                           "(weights/streaming.py installs the layers that run)")


def check_streamable(path: str, weights: str | None, device: torch.device, lora: bool) -> None:
    """A ValueError naming what is not supported when decoder layers are streamed from ``path``."""
    why = None
    if device.type != "cpu":
        why = f"it runs on the CPU (the budget is host memory), not {device}"
    elif weights == "int8":
        why = "weights int8 rotate and repack every layer at load; use native, fp32 or bf16"
    elif lora:
        why = "a merged LoRA adapter changes the weights at load; merge it into the files first (loom merge)"
    elif os.path.isdir(path) and (read_quantization(path) is not None or read_lowrank(path) is not None):
        why = "loom-quantized and low-rank checkpoints are not supported; stream a GGUF or a plain HF folder"
    if why is not None:
        raise ValueError(f"cannot stream the decoder layers of {path} under a memory budget: {why}")


def _unload_layers(model: Transformer, sources: dict[str, list[str]], path: str, fmt: str, native: bool,
                   kernel: str) -> tuple[dict[str, list[str]], LayerSources]:
    """Replace the model's decoder layers by ``UnloadedLayer``s; return the sources still to load now (everything
    but the layers) and the LayerSources that build the layers later."""
    config = model.config
    if config.num_experts or config.is_mla:
        raise ValueError(f"cannot stream the decoder layers of {path} under a memory budget: mixture-of-experts "
                         "and latent-attention layers are not supported (dense decoder layers are)")
    layer_names = {name: names for name, names in sources.items() if name.startswith("layers.")}
    splits = {name: rows for name, rows in model.fused_row_splits().items() if name in layer_names}
    for i in range(config.num_layers):
        model.layers[i] = UnloadedLayer(i)
    rest = {name: names for name, names in sources.items() if name not in layer_names}
    return rest, LayerSources(path, fmt, config, model.dtype, native, layer_names, splits, kernel)


def open_hf_checkpoint(folder: str) -> tuple[ModelConfig, SafetensorsCheckpoint]:
    """An HF folder's config and checkpoint, checked against each other before anything is built from them:
    the layer count and every tensor's shape (a quantized linear's by its stored rows)."""
    config = read_hf_config(folder)
    ckpt = SafetensorsCheckpoint(folder, family_of(config).base_prefix)
    check_hf_checkpoint(config, ckpt, lambda name: stored_shape(ckpt, name))
    return config, ckpt


def check_w8a8(device: torch.device) -> None:
    if device.type != "cpu" or not onednn_int8_available():
        raise ValueError("weights 'int8' run on the CPU's int8 matrix units: they need a CPU device, a torch "
                         "build with oneDNN's int8 GEMM and loom's native kernels (python -m loom.native)")


def w8a8_model(model: Transformer) -> None:
    """An fp32 model -> bf16 activations with W8A8 decoder linears, in place: the residual stream rotated
    (models/rotation.py), every decoder linear int8 per output channel in oneDNN's layout with int8
    activations per token (``PackedW8A8Linear``), everything else (embedding, norms, a tied output layer) bf16."""
    online = rotate(model)
    pack_w8a8_linears(model, online)
    model.cast_parameters(torch.bfloat16)
    release_freed_memory()  # the fp32 weights just freed: give their pages back (resident size = one copy)


def release_freed_memory() -> None:
    """Ask glibc to return freed heap pages to the system (``malloc_trim``), so that the resident size after a
    conversion shows the weights kept, not the high-water mark of building them. A no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX)``): each thread that allocates (an I/O or fill thread,
    torch's) otherwise gets an arena of its own, whose freed pages stay resident. Process-wide; a no-op
    elsewhere. Under a memory budget this lowers the peak resident size by a few MB (bench offload)."""
    import ctypes
    import ctypes.util

    M_ARENA_MAX = -8  # glibc's malloc.h
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError, TypeError):
        pass


def place_native_linears(sources: dict[str, list[str]], place: Callable[[str, list[str], list[str] | None], bool],
                         targets: list[str] | None = None) -> set[str]:
    """For every linear ``target`` (default: the ``*_proj`` ones in ``sources``), ``place(target, weight parts,
    bias parts or None)`` installs it natively (True) or leaves it to the dense fill (False); placed ones leave
    ``sources``. Returns the biases placed with their linears (parameters filled already)."""
    filled: set[str] = set()
    if targets is None:
        targets = [n[: -len(".weight")] for n in sources if n.endswith("_proj.weight")]
    for target in targets:
        if place(target, sources[target + ".weight"], sources.get(target + ".bias")):
            sources.pop(target + ".weight")
            if sources.pop(target + ".bias", None) is not None:
                filled.add(target + ".bias")
    return filled


def native_gguf_linears(model: Transformer, g: GGUFFile, sources: dict[str, list[str]],
                        device: torch.device | None = None) -> tuple[dict[str, list[str]], set[str]]:
    """Replace the linears whose GGUF parts all have a native form (weights/native.py) with the same bits and
    group size by quantized ones, built
    on ``device`` (so that their kernels are chosen for it); return the sources still to fill densely
    and the parameters already filled. A quantized embedding stays quantized: the lookup dequantizes its
    tokens' rows (``QuantizedEmbedding``), from the output layer's own codes when the two are tied (one copy)."""
    sources = dict(sources)
    filled: set[str] = set()
    targets = [name[: -len(".weight")] for name in sources
               if name.endswith("_proj.weight") or name == "lm_head.weight"]
    if model.config.tie_word_embeddings:
        targets.append("lm_head")
        sources["lm_head.weight"] = sources["embed_tokens.weight"]

    def place(target: str, parts: list[str], bias: list[str] | None) -> bool:
        module = native_linear(g, model.config, parts, bias, device)
        if module is not None:
            model.replace_module(target, module)
        return module is not None

    filled |= place_native_linears(sources, place, targets)
    if model.config.tie_word_embeddings:
        sources.pop("lm_head.weight", None)
        if isinstance(model.lm_head, QuantizedLinear):
            model.replace_module("embed_tokens", QuantizedEmbedding(model.lm_head, model.dtype, tied=True))
            del sources["embed_tokens.weight"]
    elif sources.get("embed_tokens.weight") == ["token_embd.weight"]:
        qt = gguf_quantized(g, model.config, "token_embd.weight")
        if qt is not None:
            table = QuantizedLinear(qt.to(device or "cpu"))
            model.replace_module("embed_tokens", QuantizedEmbedding(table, model.dtype))
            del sources["embed_tokens.weight"]
    return sources, filled


def native_linear(g: GGUFFile, config: ModelConfig, parts: list[str], bias_parts: list[str] | None = None,
                  device: torch.device | None = None) -> QuantizedLinear | None:
    """The quantized linear whose weight is the row-wise concatenation of the GGUF tensors ``parts`` (and whose
    bias is that of ``bias_parts``), or None when a part has no native form (weights/native.py) or the parts'
    group sizes differ: it is then filled densely. Parts of different bits are widened to the largest."""
    if any(p.endswith("]") for p in parts):  # an expert's slice of a stacked MoE tensor: dequantized
        return None
    qts = [gguf_quantized(g, config, p) for p in parts]
    if any(q is None for q in qts) or len({q.group_size for q in qts}) != 1:  # type: ignore[union-attr]
        return None
    bits = {q.bits for q in qts}  # type: ignore[union-attr]
    if len(bits) > 1:  # e.g. a Q5_0 q, k and a Q8_0 v: fused as int8, each part exactly
        qts = [q.widened(max(8, *bits)) for q in qts]  # type: ignore[union-attr]
    bias = None
    if bias_parts is not None:
        bias = torch.cat([read_gguf_tensor(g, config, p) for p in bias_parts])
    qt = QuantizedTensor.cat(qts).to(device or "cpu")  # type: ignore[arg-type]
    return QuantizedLinear(qt, None if bias is None else bias.to(qt.device))
