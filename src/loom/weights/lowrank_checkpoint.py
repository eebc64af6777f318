"""Low-rank checkpoints: a factorized model in a Hugging Face-shaped folder that ``load_model`` reads back.

    DIR/config.json          the model's HF config + "lowrank" {"method": ..., "keep": ..., ...}
    DIR/model.safetensors    for each factorized HF projection X (X.weight in a dense checkpoint):
                               X.lowrank_up     [out, r]
                               X.lowrank_down   [r, in]       (W ~ X.lowrank_up @ X.lowrank_down)
                             X.bias and every other tensor as in a dense checkpoint

Each HF projection is stored under its own name with its own rank (loom's fused q|k|v and gate|up are held
as ``FusedLinear`` s of their parts, layers/lowrank.py), so the stored factors are exactly the parameters the
model has. Factors are stored as they are held (fp32): a round trip is bit for bit. ``save_checkpoint``
(quantized_checkpoint.py) writes these folders, given ``lowrank=`` metadata.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from loom.layers.lowrank import FusedLinear, LowRankLinear, dense_part, is_lowrank
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError

UP, DOWN = ".lowrank_up", ".lowrank_down"


def _base(hf_name: str) -> str:
    return hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name


def _part_name(hf_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'q_proj'."""
    return _base(hf_name).rpartition(".")[2]


def lowrank_tensors(module: nn.Module, hf_names: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors a linear slot holding low-rank parts saves under its HF parts' names (biases aside: they
    are saved as in a dense checkpoint); None when it holds none."""
    if not is_lowrank(module):
        return None
    parts = list(module.parts) if isinstance(module, FusedLinear) else [module]
    if len(parts) != len(hf_names):
        raise ValueError(f"a linear with {len(parts)} parts cannot be saved as {len(hf_names)} HF tensors")
    out: dict[str, torch.Tensor] = {}
    for part, hf in zip(parts, hf_names):
        if isinstance(part, LowRankLinear):
            out[_base(hf) + UP] = part.up.detach().float().contiguous()
            out[_base(hf) + DOWN] = part.down.detach().float().contiguous()
        else:
            out[hf] = part.dequantized_weight().detach().float().contiguous()
    return out


def read_lowrank(folder: str) -> dict[str, Any] | None:
    """The folder's "lowrank" record (config.json), or None for a checkpoint that is not factorized."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            record = json.load(f).get("lowrank")
    except (OSError, json.JSONDecodeError):
        return None
    return record or None


def _file(ckpt: Any, name: str) -> str:
    return os.path.join(ckpt.folder, ckpt.weight_map.get(name, "model.safetensors"))


def lowrank_shape(ckpt: Any, base: str) -> tuple[int, int]:
    """(out, in) of the projection stored as ``base``.lowrank_up / .lowrank_down; a WeightsError naming the file
    and the tensor when the factors are not [out, r] and [r, in] with one r."""
    up_name, down_name = base + UP, base + DOWN
    if down_name not in ckpt:
        raise WeightsError(ckpt.folder, f"{up_name} is stored without its other factor", down_name)
    up, down = tuple(ckpt.shape(up_name)), tuple(ckpt.shape(down_name))
    if len(up) != 2:
        raise WeightsError(_file(ckpt, up_name), f"a low-rank factor must be 2-D [out, r], got shape {up}", up_name)
    if len(down) != 2:
        raise WeightsError(_file(ckpt, down_name), f"a low-rank factor must be 2-D [r, in], got shape {down}",
                           down_name)
    if up[1] != down[0] or up[1] < 1:
        raise WeightsError(_file(ckpt, down_name), f"shape {down} does not match {up_name}'s {up}: the factors "
                                                   f"must be [out, r] and [r, in] with one rank r", down_name)
    return up[0], down[1]


def load_lowrank_linears(model: Transformer, sources: dict[str, list[str]], ckpt: Any
                         ) -> tuple[dict[str, list[str]], set[str]]:
    """Install the checkpoint's low-rank linears (``LowRankLinear``, or a ``FusedLinear`` of the parts of a
    fused slot, parts without factors dense) in the model's dtype; return the sources still to be filled
    densely and the parameters already filled."""
    sources = dict(sources)
    filled: set[str] = set()
    for name in [n for n in sources if n.endswith(".weight")]:
        hf_names = sources[name]
        if not any(_base(hf) + UP in ckpt for hf in hf_names):
            continue
        target = name[: -len(".weight")]
        bias_names = sources.pop(target + ".bias", None)
        parts: list[nn.Module] = []
        for k, hf in enumerate(hf_names):
            bias = None if bias_names is None else _read(ckpt, bias_names[k], model.dtype)
            base = _base(hf)
            if base + UP in ckpt:
                lowrank_shape(ckpt, base)
                parts.append(LowRankLinear(_read(ckpt, base + DOWN, model.dtype), _read(ckpt, base + UP, model.dtype),
                                           bias))
            else:
                parts.append(dense_part(_read(ckpt, hf, model.dtype), bias))
        module = parts[0] if len(parts) == 1 else FusedLinear(parts, [_part_name(hf) for hf in hf_names])
        del sources[name]
        filled.update(f"{target}.{p}" for p, _ in module.named_parameters())
        model.replace_module(target, module)
    return sources, filled


def _read(ckpt: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = ckpt.tensor(name)
    return t if t.dtype == dtype else t.float().to(dtype)
