"""Quantized checkpoints: a Hugging Face-shaped folder that keeps loom's quantized linears.

    DIR/config.json            the model's HF config + "quantization_config" {"quant_method": "loom", ...}
                               and, for a pruned model, "pruning" {"method": ..., "sparsity": ..., ...}
    DIR/model.safetensors      dense tensors under their HF names; for each quantized linear X.weight:
                                 X.qweight   uint8 codes (two per byte for <= 4 bits, loom's int4 layout)
                                 X.scales    fp32 [out, in / group]
                                 X.offsets   fp32 [out, in / group]      (w = q scale + offset)
                               or, for W8A8 (SmoothQuant): X.weight_int8 int8 [out, in], X.weight_scale fp32 [out]
                               or, for a low-rank factorized projection: X.lowrank_up [out, r], X.lowrank_down [r, in]
                               with "lowrank" {...} in config.json (weights/lowrank_checkpoint.py)
    DIR/tokenizer.json, tokenizer_config.json

Fused loom layers (q|k|v, gate|up) are split back into their HF parts on saving, so any reader of HF
names finds each projection; codes are stored exactly, so a round trip is bit for bit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

from loom.layers.linear import Linear
from loom.layers.lowrank import FusedLinear
from loom.layers.quantized import QuantizedLinear, QuantizedTensor, W8A8Linear, pack_int4, unpack_int4
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.hf import hf_config_dict, hf_tensor_sources
from loom.weights.lowrank_checkpoint import UP as LOWRANK_UP
from loom.weights.lowrank_checkpoint import lowrank_shape, lowrank_tensors

QUANT_METHOD = "loom"


def _base(hf_name: str) -> str:
    return hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name


def save_checkpoint(model: Transformer, folder: str, quantization: dict[str, Any] | None = None,
                    tokenizer: Any = None, pruning: dict[str, Any] | None = None,
                    lowrank: dict[str, Any] | None = None) -> None:
    """Write ``model`` (dense, with quantized linears or with low-rank ones) as a folder that ``load_model``
    reads; ``quantization``, ``pruning`` and ``lowrank`` are recorded in its config.json (readers of the
    weights ignore "pruning": a pruned weight is an ordinary tensor with zeros)."""
    config = model.config
    cfg = hf_config_dict(config)  # first: a layout loom cannot write (gpt2, opt, bloom) is refused before any file
    os.makedirs(folder, exist_ok=True)
    sources = hf_tensor_sources(config, None)  # type: ignore[arg-type]
    if model.lm_head is not None and "lm_head.weight" not in sources:
        sources["lm_head.weight"] = ["lm_head.weight"]
    splits = model.fused_row_splits()
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in sources.items():
        prefix = name.rpartition(".")[0]
        module = model.get_submodule(prefix) if prefix else model
        rows = splits.get(name, [None])
        factors = lowrank_tensors(module, parts) if name.endswith(".weight") else None
        if factors is not None:
            tensors.update(factors)
            continue
        if isinstance(module, (QuantizedLinear, W8A8Linear)) and name.endswith(".weight"):
            starts = _row_starts(rows, module.out_features)
            for hf, (a, b) in zip(parts, starts):
                base = _base(hf)
                if isinstance(module, W8A8Linear):
                    tensors[base + ".weight_int8"] = module.weight_int8[a:b].contiguous()
                    tensors[base + ".weight_scale"] = module.weight_scale[a:b].contiguous()
                    continue
                qt = module.quantized().rows(slice(a, b))
                tensors[base + ".qweight"] = pack_int4(qt.codes) if qt.bits <= 4 else qt.codes
                tensors[base + ".scales"] = qt.scales
                tensors[base + ".offsets"] = qt.offsets
            continue
        if name.endswith(".bias") and isinstance(module, (QuantizedLinear, W8A8Linear, FusedLinear)):
            tensor = module.bias.detach() if module.bias is not None else None
        else:
            tensor = params[name].detach() if name in params else None
        if tensor is None:
            continue
        starts = _row_starts(rows, tensor.shape[0])
        for hf, (a, b) in zip(parts, starts):
            tensors[hf] = tensor[a:b].float().contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if quantization is not None:
        cfg["quantization_config"] = {"quant_method": QUANT_METHOD, **quantization}
    if pruning is not None:
        cfg["pruning"] = pruning
    if lowrank is not None:
        cfg["lowrank"] = lowrank
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(folder)


def _row_starts(rows: list[int | None], total: int) -> list[tuple[int, int]]:
    if rows == [None]:
        return [(0, total)]
    out, a = [], 0
    for n in rows:
        out.append((a, a + int(n)))  # type: ignore[arg-type]
        a += int(n)  # type: ignore[arg-type]
    return out


def read_quantization(folder: str) -> dict[str, Any] | None:
    """The folder's loom quantization settings, or None for a dense checkpoint."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            q = json.load(f).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None
    if not q:
        return None
    if q.get("quant_method") != QUANT_METHOD:
        raise WeightsError(path, f"unsupported quantization {q.get('quant_method')!r} (loom reads its own: "
                                 f"quant_method {QUANT_METHOD!r})")
    return q


def stored_shape(ckpt: Any, name: str) -> tuple[int | None, ...]:
    """The shape ``name`` has in a checkpoint that may hold it quantized or factorized: a dense tensor's own,
    else its int8 weight's (X.weight_int8, [out, in]), else the rows of its codes (X.qweight, whose columns are
    packed), else (out, in) of its low-rank factors (checked against each other)."""
    base = _base(name)
    if name in ckpt or not name.endswith(".weight"):
        return ckpt.shape(name)
    if base + LOWRANK_UP in ckpt:
        return lowrank_shape(ckpt, base)
    if base + ".weight_int8" in ckpt:
        return ckpt.shape(base + ".weight_int8")
    if base + ".qweight" in ckpt:
        return (ckpt.shape(base + ".qweight")[0], None)
    return ckpt.shape(name)


def load_quantized_linears(model: Transformer, quant: dict[str, Any], sources: dict[str, list[str]], ckpt: Any,
                           dequantize: bool = False, device: torch.device | None = None
                           ) -> tuple[dict[str, list[str]], set[str]]:
    """Install the checkpoint's quantized linears (or their dequantized weights, if ``dequantize``), built on
    ``device``; return the sources still to be filled densely and the parameters already filled.
    A recorded "loom" backend (CPU kernels) means "auto" on a GPU."""
    sources = dict(sources)
    filled: set[str] = set()
    bits = int(quant["bits"])
    dev = torch.device(device or "cpu")
    backend = str(quant.get("backend", "auto"))
    if dev.type != "cpu" and backend == "loom":
        backend = "auto"
    if "lm_head.qweight" in ckpt or "lm_head.weight_int8" in ckpt:
        sources.setdefault("lm_head.weight", ["lm_head.weight"])
    for name in [n for n in sources if n.endswith(".weight")]:
        parts = [_base(p) for p in sources[name]]
        target = name[: -len(".weight")]
        if all(p + ".weight_int8" in ckpt for p in parts):
            w = torch.cat([ckpt.tensor(p + ".weight_int8") for p in parts])
            s = torch.cat([ckpt.tensor(p + ".weight_scale").float() for p in parts])
            bias = _bias(sources, target, ckpt)
            module: torch.nn.Module = W8A8Linear.from_int8(w, s, bias)
        elif all(p + ".qweight" in ckpt for p in parts):
            qts = []
            for p in parts:
                q, scales = ckpt.tensor(p + ".qweight"), ckpt.tensor(p + ".scales").float()
                codes = unpack_int4(q) if bits <= 4 else q
                qts.append(QuantizedTensor(codes, scales, ckpt.tensor(p + ".offsets").float(), bits,
                                           codes.shape[1] // scales.shape[1]))
            bias = _bias(sources, target, ckpt)
            module = QuantizedLinear(QuantizedTensor.cat(qts).to(dev), None if bias is None else bias.to(dev), backend)
        else:
            continue
        del sources[name]
        if dequantize:
            dense = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantized_weight().to(model.dtype)
            if module.bias is not None:
                dense.bias.data = module.bias.data.to(model.dtype)
            module = dense
        filled.update(f"{target}.{p}" for p, _ in module.named_parameters())
        model.replace_module(target, module)
    return sources, filled


def _bias(sources: dict[str, list[str]], target: str, ckpt: Any) -> torch.Tensor | None:
    names = sources.pop(target + ".bias", None)
    return None if names is None else torch.cat([ckpt.tensor(n).float() for n in names])
