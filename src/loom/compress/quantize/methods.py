"""Apply a post-training quantization method to a whole model, layer by layer on calibration data.

    rtn          round to nearest, no data
    awq          activation-aware scales + clipping, then RTN codes   (awq.py)
    gptq         Hessian-guided error feedback                         (gptq.py)
    smoothquant  smoothing + W8A8 (int8 activations too)               (smoothquant.py)
    w8a8         W8A8 without smoothing (the naive baseline)

Data-driven methods see each layer's inputs as produced by the layers before it *after* those
were quantized (``LayerwiseCalibration``), the sequential scheme of GPTQ and AWQ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from loom.compress.calibration import LayerwiseCalibration
from loom.compress.quantize.awq import AWQConfig, search_clip, search_scales
from loom.compress.quantize.gptq import GPTQConfig, Hessian, gptq_quantize
from loom.compress.quantize.rtn import QuantConfig, rtn_quantize
from loom.compress.quantize.smoothquant import smoothing_scales
from loom.layers.linear import Linear
from loom.layers.moe import MoE, expert_linears as moe_expert_linears
from loom.layers.quantized import QuantizationError, QuantizedLinear, QuantizedTensor, W8A8Linear
from loom.models.transformer import Transformer

METHODS = ("rtn", "awq", "gptq", "smoothquant", "w8a8")
# A decoder layer's linears in forward order (up_proj: ungated MLPs). Embeddings and the output
# head are left alone, as in the GPTQ and AWQ papers.
LAYER_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.up_proj", "mlp.down_proj")


def layer_linears(model: Transformer, i: int) -> list[tuple[str, nn.Module]]:
    """(name relative to the layer, module) of layer i's linears that the model has."""
    block = model.layers[i]
    names = dict(block.named_modules())
    return [(name, names[name]) for name in LAYER_LINEARS if name in names]


def expert_linears(model: Transformer, i: int) -> list[tuple[str, nn.Module]]:
    """(name relative to the layer, module) of layer i's experts' linears (layers/moe.py), [] for a dense MLP."""
    mlp = model.layers[i].mlp
    return [(f"mlp.{name}", m) for name, m in moe_expert_linears(mlp)] if isinstance(mlp, MoE) else []


@dataclass
class QuantizeRecipe:
    method: str = "rtn"
    quant: QuantConfig = field(default_factory=QuantConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    alpha: float = 0.5  # SmoothQuant migration strength
    backend: str = "auto"

    def metadata(self) -> dict[str, Any]:
        """What a quantized checkpoint's config records."""
        meta: dict[str, Any] = {"method": self.method}
        if self.method in ("smoothquant", "w8a8"):
            meta.update(bits=8, activations=8, alpha=self.alpha if self.method == "smoothquant" else None)
        else:
            meta.update(bits=self.quant.bits, group_size=self.quant.group_size, symmetric=self.quant.symmetric)
        if self.method == "awq":
            meta["awq"] = asdict(self.awq)
        if self.method == "gptq":
            meta["gptq"] = asdict(self.gptq)
        return meta


def _check_shape(model: Transformer) -> None:
    c = model.config
    if not (c.norm == "rmsnorm" and c.norm_placement == "pre" and c.gated_mlp):
        raise QuantizationError("data-driven methods fold scales into pre-norm RMSNorm weights and need a gated "
                                "MLP (Llama-shaped models); use rtn for other shapes")
    if c.num_experts:
        raise QuantizationError("data-driven methods do not calibrate mixture-of-experts layers yet; use rtn")


def _set(model: Transformer, i: int, name: str, module: nn.Module) -> None:
    model.replace_module(f"layers.{i}.{name}", module)


def _weight_only(layer: Linear, qt: QuantizedTensor, recipe: QuantizeRecipe) -> QuantizedLinear:
    return QuantizedLinear(qt, None if layer.bias is None else layer.bias.detach(), recipe.backend)


@torch.no_grad()
def quantize(model: Transformer, recipe: QuantizeRecipe, calibration: torch.Tensor | None = None) -> Transformer:
    """Quantize every decoder linear of ``model`` in place (embeddings and the output head stay dense)."""
    if recipe.method not in METHODS:
        raise QuantizationError(f"unknown method {recipe.method!r}; choose one of {METHODS}")
    if recipe.method == "rtn":  # no data: every linear on its own
        for i in range(model.config.num_layers):
            for name, layer in layer_linears(model, i) + expert_linears(model, i):  # experts too: each on its own
                if type(layer) is Linear:
                    _set(model, i, name, _weight_only(layer, rtn_quantize(layer.weight.float(), recipe.quant), recipe))
        return model
    if calibration is None:
        raise QuantizationError(f"{recipe.method} needs calibration samples")
    _check_shape(model)
    calib = LayerwiseCalibration(model, calibration)
    step = {"awq": _awq_layer, "gptq": _gptq_layer, "smoothquant": _smooth_layer, "w8a8": _smooth_layer}
    for i in calib.layers(desc=f"{recipe.method} layers"):
        step[recipe.method](model, i, calib, recipe)
    return model


def _linears(model: Transformer, i: int) -> tuple[Linear, Linear, Linear, Linear]:
    block = model.layers[i]
    mods = (block.attn.qkv_proj, block.attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj)
    if not all(type(m) is Linear for m in mods):
        raise QuantizationError(f"layer {i} is already quantized")
    return mods  # type: ignore[return-value]


def _awq_layer(model: Transformer, i: int, calib: LayerwiseCalibration, recipe: QuantizeRecipe) -> None:
    block, c = model.layers[i], model.config
    qkv, o, gate_up, down = _linears(model, i)
    x_qkv, x_o, x_gu, x_down = calib.capture([qkv, o, gate_up, down])
    q, a = recipe.quant, recipe.awq
    # scales, each folded into the op that produces the input
    s = search_scales(x_qkv, qkv.weight, q, a)
    block.attn_norm.weight.div_(s)
    qkv.weight.mul_(s[None, :])
    x_qkv = x_qkv / s
    if c.num_kv_heads == c.num_heads:  # v rows feed o's inputs one to one only without GQA
        s = search_scales(x_o, o.weight, q, a)
        qkv.weight[c.q_size + c.kv_size:].div_(s[:, None])
        o.weight.mul_(s[None, :])
        x_o = x_o / s
    s = search_scales(x_gu, gate_up.weight, q, a)
    block.mlp_norm.weight.div_(s)
    gate_up.weight.mul_(s[None, :])
    x_gu = x_gu / s
    s = search_scales(x_down, down.weight, q, a)
    gate_up.weight[c.intermediate_size:].div_(s[:, None])  # the up rows: silu(g) * (u / s)
    down.weight.mul_(s[None, :])
    x_down = x_down / s
    for name, layer, x, skip in (("attn.qkv_proj", qkv, x_qkv, c.q_size + c.kv_size), ("attn.o_proj", o, x_o, 0),
                                 ("mlp.gate_up_proj", gate_up, x_gu, 0), ("mlp.down_proj", down, x_down, 0)):
        clip = search_clip(x, layer.weight, q, a, skip_rows=skip) if a.clip else None
        _set(model, i, name, _weight_only(layer, rtn_quantize(layer.weight, q, clip), recipe))


def _gptq_layer(model: Transformer, i: int, calib: LayerwiseCalibration, recipe: QuantizeRecipe) -> None:
    # "true sequential": each linear sees inputs computed with the linears before it already quantized
    for name, _ in layer_linears(model, i):
        layer = model.layers[i].get_submodule(name)  # the previous ones are quantized by now
        h = Hessian(layer.in_features)
        calib.run({layer: h.add})
        qt = gptq_quantize(layer.weight.float(), h.value(), recipe.quant, recipe.gptq)
        _set(model, i, name, _weight_only(layer, qt, recipe))


def _smooth_layer(model: Transformer, i: int, calib: LayerwiseCalibration, recipe: QuantizeRecipe) -> None:
    block = model.layers[i]
    qkv, o, gate_up, down = _linears(model, i)
    if recipe.method == "smoothquant":
        maxes = {qkv: torch.zeros(qkv.in_features), gate_up: torch.zeros(gate_up.in_features)}

        def track(m: nn.Module):
            return lambda x: maxes[m].copy_(torch.maximum(maxes[m], x.abs().amax(dim=0)))

        calib.run({m: track(m) for m in maxes})
        for norm, layer in ((block.attn_norm, qkv), (block.mlp_norm, gate_up)):
            s = smoothing_scales(maxes[layer], layer.weight, recipe.alpha)
            norm.weight.div_(s)
            layer.weight.mul_(s[None, :])
    for name, layer in layer_linears(model, i):
        _set(model, i, name, W8A8Linear(layer.weight, None if layer.bias is None else layer.bias.detach()))
