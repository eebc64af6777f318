"""Prune a whole model, layer by layer on calibration data, optionally quantizing it too.

    magnitude  smallest |W| per layer, no data                          (magnitude.py)
    wanda      smallest |W| ||X_j|| per output row                      (wanda.py)
    sparsegpt  OBS saliency per block, errors absorbed by later columns (sparsegpt.py)

Each decoder layer's linears are pruned; embeddings and the output head stay dense (as in both
papers). Data-driven methods walk the layers in order with ``LayerwiseCalibration``: layer i's
statistics are gathered on the outputs of layers 0..i-1 *already pruned*, in one pass over the
calibration samples per layer (all of a layer's linears at once, as the papers' reference code does).

Fused projections (q|k|v, gate|up) are pruned part by part, each part being the model's own linear
(q_proj, k_proj, ...): magnitude's per-layer threshold and SparseGPT's per-block one are per projection,
not shared across them. With ``quant``, the result is weight-only quantized: SparseGPT in the same sweep
(joint mode), magnitude and Wanda by RTN after pruning (zeros stay zero: 0 is on every grid).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from loom.compress.calibration import LayerwiseCalibration
from loom.compress.prune.magnitude import magnitude_mask
from loom.compress.prune.masks import PruningError, Target, check_target, describe
from loom.compress.prune.sparsegpt import PrunedWeight, SparseGPT, SparseGPTConfig
from loom.compress.prune.wanda import InputNorms, wanda_mask
from loom.compress.quantize.gptq import Hessian
from loom.compress.quantize.methods import layer_linears
from loom.compress.quantize.rtn import QuantConfig, rtn_quantize
from loom.layers.linear import Linear
from loom.layers.quantized import QuantizedLinear, QuantizedTensor
from loom.models.transformer import Transformer

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneRecipe:
    """``target``: a sparsity in [0, 1) or an ``NMPattern``; ``quant``: also quantize (weight-only)."""

    method: str = "wanda"
    target: Target = 0.5
    quant: QuantConfig | None = None
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    backend: str = "auto"  # kernel of the quantized linears

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruningError(f"unknown pruning method {self.method!r}; choose one of {METHODS}")
        check_target(self.target)

    def metadata(self) -> dict[str, Any]:
        """What a pruned checkpoint's config records under "pruning"."""
        meta: dict[str, Any] = {"method": self.method, **describe(self.target)}
        if self.method == "sparsegpt":
            meta["sparsegpt"] = asdict(self.sparsegpt)
        return meta

    def quantization_metadata(self) -> dict[str, Any] | None:
        """What it records under "quantization_config" (None when not quantized)."""
        if self.quant is None:
            return None
        return {"method": "sparsegpt" if self.method == "sparsegpt" else "rtn", "bits": self.quant.bits,
                "group_size": self.quant.group_size, "symmetric": self.quant.symmetric, "backend": self.backend}


@torch.no_grad()
def prune(model: Transformer, recipe: PruneRecipe, calibration: torch.Tensor | None = None) -> Transformer:
    """Prune (and maybe quantize) every decoder linear of ``model`` in place; ``calibration``: token ids
    [samples, seq_len], needed by Wanda and SparseGPT."""
    _check_model(model, recipe)
    if recipe.method == "magnitude":
        for i in tqdm(range(model.config.num_layers), desc="magnitude layers", unit="layer"):
            for name, layer in layer_linears(model, i):
                _install(model, i, name, _prune_linear(model, i, name, layer, None, recipe))
        return model
    if calibration is None:
        raise PruningError(f"{recipe.method} needs calibration samples")
    calib = LayerwiseCalibration(model, calibration)
    for i in calib.layers(desc=f"{recipe.method} layers"):
        linears = layer_linears(model, i)
        stats = {layer: _statistic(recipe.method, layer.in_features) for _, layer in linears}
        calib.run({layer: stat.add for layer, stat in stats.items()})
        for name, layer in linears:
            data = stats[layer].value()
            if recipe.method == "sparsegpt":  # one factorization of H for all the projections that share it
                data = SparseGPT(data, recipe.sparsegpt)
            _install(model, i, name, _prune_linear(model, i, name, layer, data, recipe))
    return model


def _check_model(model: Transformer, recipe: PruneRecipe) -> None:
    """Every problem with the target or the grid, before any work is done."""
    if model.config.num_experts:
        raise PruningError("pruning does not reach mixture-of-experts layers yet (their experts would stay dense)")
    for i in range(model.config.num_layers):
        for name, layer in layer_linears(model, i):
            if type(layer) is not Linear:
                raise PruningError(f"layer {i} {name} is not a dense linear (already quantized?)")
            check_target(recipe.target, layer.in_features)
            if recipe.quant is not None:
                recipe.quant.group_for(layer.in_features)


def _statistic(method: str, in_features: int) -> InputNorms | Hessian:
    return InputNorms(in_features) if method == "wanda" else Hessian(in_features)


def _row_parts(model: Transformer, i: int, name: str, rows: int) -> list[slice]:
    """Row ranges of the model's own projections inside a (possibly fused) linear."""
    sizes = model.fused_row_splits().get(f"layers.{i}.{name}.weight", [rows])
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    return [slice(a, a + size) for a, size in zip(starts, sizes)]


def _prune_linear(model: Transformer, i: int, name: str, layer: Linear, data: torch.Tensor | SparseGPT | None,
                  recipe: PruneRecipe) -> nn.Module:
    """The pruned replacement of ``layer``: a dense Linear, or a QuantizedLinear when quantizing."""
    w = layer.weight.detach().float()
    parts = [_prune_weight(w[rows], data, recipe) for rows in _row_parts(model, i, name, w.shape[0])]
    bias = None if layer.bias is None else layer.bias.detach()
    if recipe.quant is not None:
        qt = QuantizedTensor.cat([p.quantized for p in parts])  # type: ignore[misc]
        return QuantizedLinear(qt, bias, recipe.backend)
    dense = Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=layer.weight.dtype)
    dense.weight.copy_(torch.cat([p.weight for p in parts]))
    if bias is not None:
        dense.bias.copy_(bias)
    return dense


def _prune_weight(w: torch.Tensor, data: torch.Tensor | SparseGPT | None, recipe: PruneRecipe) -> PrunedWeight:
    """One projection's weight [N, K]; ``data``: Wanda's input norms or SparseGPT's factored Hessian."""
    if isinstance(data, SparseGPT):
        return data.prune(w, recipe.target, recipe.quant)
    mask = magnitude_mask(w, recipe.target) if recipe.method == "magnitude" else \
        wanda_mask(w, data, recipe.target)  # type: ignore[arg-type]
    pruned = w.masked_fill(mask, 0.0)
    if recipe.quant is None:
        return PrunedWeight(pruned, mask)
    qt = rtn_quantize(pruned, recipe.quant)
    return PrunedWeight(qt.dequantize(), mask, qt)


def _install(model: Transformer, i: int, name: str, module: nn.Module) -> None:
    model.replace_module(f"layers.{i}.{name}", module)


def linear_sparsity(model: Transformer) -> float:
    """Fraction of exact zeros over the decoder linears' (dequantized) weights."""
    zeros = total = 0
    for i in range(model.config.num_layers):
        for _, layer in layer_linears(model, i):
            w = layer.dequantized_weight()
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total
