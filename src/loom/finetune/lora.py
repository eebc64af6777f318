"""Trainable LoRA adapters on loom's Transformer, saved in PEFT's format.

LoRA (Hu et al. 2021) freezes a linear's W and learns y = x W^T + s (x A^T) B^T with A (r x in), B (out x r),
s = lora_alpha / r (rsLoRA, Kalajievski 2023: lora_alpha / sqrt(r)); A starts Kaiming-uniform and B at zero,
as PEFT starts them, so training begins from the base model. loom fuses q|k|v and gate|up into one linear
each; a ``LoraLinear`` keeps one (A, B) per HF projection inside it, so the adapter is exactly PEFT's (its
keys are PEFT's ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``) and loads in PEFT, and
``loom --lora`` merges it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from loom.layers.linear import Linear
from loom.layers.nf4 import NF4Linear
from loom.models.transformer import Transformer

# loom's linear in a decoder layer -> (the HF module holding its parts, the HF projections in row order)
PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attn.qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "attn.o_proj": ("self_attn", ("o_proj",)),
    "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "mlp.down_proj": ("mlp", ("down_proj",)),
}
ALL_LINEAR = tuple(p for _, parts in PARTS.values() for p in parts)


@dataclass
class LoraConfig:
    """Which projections get an adapter and how it is scaled (PEFT's fields and defaults' meaning)."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"  # HF projection names, or every decoder linear
    use_rslora: bool = False
    seed: int = 0  # A's initialization

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        unknown = set(self.targets) - set(ALL_LINEAR)
        if unknown:
            raise ValueError(f"target_modules {sorted(unknown)} are not decoder projections ({', '.join(ALL_LINEAR)})")

    @property
    def targets(self) -> tuple[str, ...]:
        if self.target_modules == "all-linear":
            return ALL_LINEAR
        return tuple([self.target_modules] if isinstance(self.target_modules, str) else self.target_modules)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen loom Linear plus one LoRA pair per adapted part (a fused linear's q / k / v rows, say)."""

    def __init__(self, base: Linear | NF4Linear, parts: dict[str, int], adapted: tuple[str, ...], config: LoraConfig,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.parts = parts  # part name -> its rows, in row order
        self.scale = config.scale
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in adapted:
            a = torch.empty(config.r, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear, as PEFT
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(parts[name], config.r))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scale * (self.lora_B[name] @ self.lora_A[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not len(self.lora_A):
            return y
        h = self.dropout(x)
        names = list(self.lora_A)
        if len(names) == 1 and len(self.parts) == 1:
            return y + self.scale * ((h @ self.lora_A[names[0]].t()) @ self.lora_B[names[0]].t())
        # Every part's pair in two GEMMs: the A's stacked [k r, in], the B's as one block-diagonal
        # [out, k r] (a part without an adapter is a block of zero rows), instead of 2 k small products
        # and a concatenation.
        a = torch.cat([self.lora_A[n] for n in names])
        blocks = [self.lora_B[n] if n in self.lora_A else
                  y.new_zeros(rows, 0) for n, rows in self.parts.items()]
        b = torch.block_diag(*blocks)
        return y + self.scale * ((h @ a.t()) @ b.t())


@dataclass
class LoraModel:
    """A Transformer whose chosen linears carry LoRA pairs; everything else frozen."""

    model: Transformer
    config: LoraConfig
    modules: dict[str, LoraLinear] = field(default_factory=dict)  # "layers.N.attn.qkv_proj" -> module

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (every A and B), in a fixed order."""
        return [p for name in sorted(self.modules) for p in self.modules[name].parameters() if p.requires_grad]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's key names."""
        out = {}
        for name, module in self.modules.items():
            layer, loom_linear = name.split(".", 2)[1], name.split(".", 2)[2]
            hf_module, _ = PARTS[loom_linear]
            for part in module.lora_A:
                key = f"base_model.model.model.layers.{layer}.{hf_module}.{part}"
                out[f"{key}.lora_A.weight"] = module.lora_A[part].detach().contiguous()
                out[f"{key}.lora_B.weight"] = module.lora_B[part].detach().contiguous()
        return out

    def load_peft_weights(self, folder: str | os.PathLike[str]) -> None:
        """Set every A and B from a PEFT adapter folder of the same shape (to go on training a PEFT-made
        adapter, or to start from PEFT's exact initialization); names the file and tensor on a mismatch."""
        from loom.weights.errors import WeightsError
        from loom.weights.lora import read_adapter_tensors

        path, tensors = read_adapter_tensors(os.fspath(folder))
        tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
        ours = self.peft_state_dict()
        missing = sorted(set(ours) - set(tensors))
        if missing:
            raise WeightsError(path, f"no tensor {missing[0]} (and {len(missing) - 1} more): the adapter does not "
                                     "target this run's projections")
        with torch.no_grad():
            for key, value in ours.items():
                if tensors[key].shape != value.shape:
                    raise WeightsError(path, f"{key} is {tuple(tensors[key].shape)}, this run's is "
                                             f"{tuple(value.shape)} (another rank or model?)")
                module, part = self._module_of(key)
                (module.lora_A if ".lora_A." in key else module.lora_B)[part].copy_(tensors[key])

    def _module_of(self, key: str) -> tuple[LoraLinear, str]:
        """The LoraLinear and part a PEFT key names."""
        parts = key.split(".")
        layer, hf_module, part = parts[4], parts[5], parts[6]
        for loom_linear, (module_name, hf_parts) in PARTS.items():
            if module_name == hf_module and part in hf_parts:
                return self.modules[f"layers.{layer}.{loom_linear}"], part
        raise KeyError(key)

    def save(self, folder: str | os.PathLike[str], base_model: str | None = None) -> None:
        """PEFT's adapter folder: adapter_config.json + adapter_model.safetensors."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.config.r,
               "lora_alpha": self.config.lora_alpha, "lora_dropout": self.config.lora_dropout,
               "target_modules": sorted(self.config.targets), "use_rslora": self.config.use_rslora,
               "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
               "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
               "base_model_name_or_path": base_model, "inference_mode": True}
        with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        save_file(self.peft_state_dict(), os.path.join(folder, "adapter_model.safetensors"),
                  metadata={"format": "pt"})


def quantize_base_nf4(model: Transformer) -> int:
    """QLoRA's frozen base (Dettmers et al. 2023): every decoder linear's weight replaced by NF4 (blocks of
    64, double-quantized scales; ``compress/quantize/nf4.py``), in place; the embedding, the norms and the
    output layer stay as they are. Returns the bytes the linears' weights take now."""
    from loom.compress.quantize.nf4 import nf4_linear

    total = 0
    for i in range(model.config.num_layers):
        for loom_linear in PARTS:
            name = f"layers.{i}.{loom_linear}"
            base = model.get_submodule(name)
            if type(base) is not Linear:
                raise ValueError(f"{name} is a {type(base).__name__}: QLoRA quantizes a dense (fp32) model")
            module = nf4_linear(base.weight.detach(), base.bias)
            model.replace_module(name, module)
            total += module.weight_bytes()
    return total


def attach_lora(model: Transformer, config: LoraConfig) -> LoraModel:
    """Freeze ``model`` and give its target projections LoRA pairs (in place); the model must hold dense
    loom Linears (load it with weights fp32 or bf16) or NF4 ones (``quantize_base_nf4``, QLoRA)."""
    model.requires_grad_(False)
    splits = model.fused_row_splits()
    gen = torch.Generator().manual_seed(config.seed)
    out = LoraModel(model, config)
    for i in range(model.config.num_layers):
        for loom_linear, (_, hf_parts) in PARTS.items():
            adapted = tuple(p for p in hf_parts if p in config.targets)
            if not adapted:
                continue
            name = f"layers.{i}.{loom_linear}"
            base = model.get_submodule(name)
            if type(base) is not Linear and not isinstance(base, NF4Linear):  # quantized ones subclass Linear
                raise ValueError(f"{name} is a {type(base).__name__}, not a dense Linear or an NF4Linear: load the "
                                 "model with weights fp32 or bf16 to train LoRA on it")
            rows = splits.get(f"{name}.weight", [base.out_features])
            module = LoraLinear(base, dict(zip(hf_parts, rows)), adapted, config, gen)
            model.replace_module(name, module)
            out.modules[name] = module
    return out
