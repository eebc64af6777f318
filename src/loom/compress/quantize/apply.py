"""Walk a model's linear layers and swap dense ones for quantized ones."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from loom.layers.linear import Linear
from loom.layers.quantized import QuantizedLinear, QuantizedTensor
from loom.models.transformer import Transformer

from loom.compress.quantize.rtn import QuantConfig, rtn_quantize

LAYER_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def layer_linears(model: Transformer, layer: int) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of one decoder layer's linears, in forward order. Embeddings and the output
    head are left alone, as in the GPTQ and AWQ papers."""
    block = model.layers[layer]
    for name in LAYER_LINEARS:
        module = block.get_submodule(name) if _has(block, name) else None
        if module is not None:
            yield f"layers.{layer}.{name}", module


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def quantized_linear(layer: Linear, qt: QuantizedTensor, backend: str = "auto") -> QuantizedLinear:
    return QuantizedLinear(qt, None if layer.bias is None else layer.bias.detach(), backend)


def quantize_model(model: Transformer, config: QuantConfig, backend: str = "auto",
                   quantize: Callable[[str, torch.Tensor], QuantizedTensor] | None = None) -> Transformer:
    """Replace every decoder linear by its quantized form (RTN unless ``quantize`` is given)."""
    fn = quantize or (lambda _name, w: rtn_quantize(w, config))
    for i in range(model.config.num_layers):
        for name, module in list(layer_linears(model, i)):
            if isinstance(module, Linear):
                model.replace_module(name, quantized_linear(module, fn(name, module.weight.detach().float()), backend))
    return model
