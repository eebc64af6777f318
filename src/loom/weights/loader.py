"""Load a model (and its tokenizer) from a GGUF file or a Hugging Face folder."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from loom.config import ModelConfig
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.gguf import GGUFFile, config_from_gguf, gguf_tensor_sources, read_gguf_tensor
from loom.weights.hf import SafetensorsCheckpoint, hf_tensor_sources, read_hf_config

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


def fill_parameters(model: Transformer, sources: dict[str, list[str]], fetch: Callable[[str], torch.Tensor],
                    path: str) -> None:
    """Set every parameter of ``model`` from the source tensors named in ``sources``.

    Fused parameters (qkv, gate+up) are the row-wise concatenation of their parts; each part's shape
    is checked against the slice it fills, so a mismatch names the offending tensor.
    """
    params = dict(model.named_parameters())
    missing = set(params) - set(sources)
    if missing:
        raise WeightsError(path, f"no source for parameters {sorted(missing)[:5]}")
    splits = model.fused_row_splits()
    for name, names in sources.items():
        param = params[name]
        rows = splits.get(name, [param.shape[0]])
        parts = []
        for src, n in zip(names, rows):
            t = fetch(src)
            want = (n, *param.shape[1:])
            if tuple(t.shape) != want:
                raise WeightsError(path, f"shape {tuple(t.shape)} does not match the config's {want}", src)
            parts.append(t)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        param.data = tensor.to(model.dtype).contiguous()


def load_model(path: str | os.PathLike[str], dtype: str | torch.dtype = torch.float32,
               kernel: str = "sdpa") -> LoadedModel:
    """Build a Transformer from ``path``: a .gguf file, or a folder with config.json + safetensors."""
    path = os.fspath(path)
    dtype = resolve_dtype(dtype)
    t0 = time.perf_counter()
    if os.path.isdir(path):
        config = read_hf_config(path)
        ckpt = SafetensorsCheckpoint(path)
        model = Transformer(config, dtype=dtype, kernel=kernel)
        fill_parameters(model, hf_tensor_sources(config, ckpt), lambda n: ckpt.tensor(n).float(), path)
        fmt, metadata = "hf", None
    elif os.path.isfile(path):
        g = GGUFFile(path)
        try:
            config = config_from_gguf(g)
            model = Transformer(config, dtype=dtype, kernel=kernel)
            fill_parameters(model, gguf_tensor_sources(config), lambda n: read_gguf_tensor(g, config, n), path)
        finally:
            g.close()
        fmt, metadata = "gguf", g.metadata
    else:
        raise WeightsError(path, "no such file or folder")
    model.eval().requires_grad_(False)
    return LoadedModel(model, config, path, fmt, time.perf_counter() - t0, metadata)
