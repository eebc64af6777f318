"""LoRA adapters in PEFT's file format, merged into the base weights as they load.

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds to a frozen
linear W (out x in) the product of two small matrices: W' = W + s B A, with A (r x in), B (out x r) and
the scale s = lora_alpha / r (rsLoRA, Kalajievski 2023: lora_alpha / sqrt(r)). PEFT writes an adapter as
``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
``rank_pattern`` / ``alpha_pattern`` per module) and ``adapter_model.safetensors`` (or ``.bin``) holding
``base_model.model.<the HF module path>.lora_A.weight`` and ``.lora_B.weight`` for each adapted linear.

Merged weights run exactly as fast as the base model, through every decode path; what this cannot do is
switch adapters per request (the multi-LoRA serving issue) or merge into weights that stay quantized
(the delta of a 4-bit weight would need re-quantizing, which is not the adapter any more): an adapter
needs dense weights (``--weights fp32`` or ``bf16``). PEFT features that change more than linear weights
(DoRA, LoRA biases, ``modules_to_save``, Conv1D's transposed weights) are refused by name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from loom.weights.errors import WeightsError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraConfig:
    """The fields of PEFT's ``adapter_config.json`` that decide the merged weights."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: Any = None
    base_model_name_or_path: str | None = None

    def rank(self, module: str) -> int:
        """r for the module at HF path ``module`` (``rank_pattern``, else ``r``)."""
        return _matching(self.rank_pattern, module, self.r)

    def scale(self, module: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, for the module at HF path ``module``."""
        r, alpha = self.rank(module), _matching(self.alpha_pattern, module, self.lora_alpha)
        return alpha / (r ** 0.5 if self.use_rslora else r)


def _matching(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of ``module``'s dotted name (PEFT's rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


REFUSED = {"use_dora": "DoRA (a magnitude vector besides B A)", "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts)"}


def read_adapter_config(folder: str) -> tuple[str, Any]:
    """(the path of a PEFT folder's adapter_config.json, its parsed JSON); WeightsError if absent or unreadable."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise WeightsError(folder, f"no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        with open(path, encoding="utf-8") as f:
            return path, json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(path, f"unreadable adapter config: {e}") from None


def read_lora_config(folder: str) -> LoraConfig:
    """The adapter's LoraConfig; WeightsError naming the file for what loom does not merge."""
    path, raw = read_adapter_config(folder)
    if isinstance(raw, dict) and raw.get("peft_type") == "PROMPT_TUNING":
        raise WeightsError(path, "peft_type PROMPT_TUNING is a soft prompt (virtual tokens prepended to every "
                                 "prompt), not weights to merge: load it with loom.finetune.prompt_tuning."
                                 "load_prompt_tuning(folder, model) and generate on the module path "
                                 "(SoftPromptModel.generate_greedy); the engine does not serve soft prompts")
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise WeightsError(path, f"peft_type {raw.get('peft_type') if isinstance(raw, dict) else raw!r} is not "
                                 "LORA (loom merges LoRA adapters)")
    for key, what in REFUSED.items():
        if raw.get(key):
            raise WeightsError(path, f"{what} is not supported")
    if raw.get("bias", "none") != "none":
        raise WeightsError(path, f"bias {raw['bias']!r}: adapters that train biases are not supported")
    if raw.get("modules_to_save"):
        raise WeightsError(path, f"modules_to_save {raw['modules_to_save']} (whole trained copies of modules) "
                                 "are not supported")
    try:
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(path, f"r and lora_alpha must be numbers: {e}") from None
    if r <= 0:
        raise WeightsError(path, f"r must be positive, got {r}")
    return LoraConfig(r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)),
                      rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                      target_modules=raw.get("target_modules"), base_model_name_or_path=raw.get("base_model_name_or_path"))


def read_adapter_tensors(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(the weights file's path, its tensors) of a PEFT adapter folder, of any peft_type."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return path, load_file(path)
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise WeightsError(path, f"unreadable adapter weights: {e}") from None
    raise WeightsError(folder, f"no adapter weights ({' or '.join(WEIGHT_FILES)})")


@dataclass
class LoraAdapter:
    """An adapter read from a PEFT folder: ``deltas`` maps an HF weight name (``model.layers.0.self_attn.
    q_proj.weight``) to s B A, in fp32."""

    path: str
    config: LoraConfig
    deltas: dict[str, torch.Tensor]

    def check_names(self, known: set[str]) -> None:
        """WeightsError naming the tensor when the adapter adapts a weight the base model lacks (an adapter
        for another architecture)."""
        for name in self.deltas:
            if name not in known:
                raise WeightsError(self.path, "the adapter adapts a weight the base model does not have "
                                              "(an adapter for another architecture?)", tensor=name)

    def merged(self, fetch: Callable[[str], torch.Tensor],
               hf_name: Callable[[str], str] = lambda name: name) -> Callable[[str], torch.Tensor]:
        """``fetch`` (a source tensor's name -> its tensor, in HF layout) with each adapted weight's delta
        added; ``hf_name`` maps a source name to its HF name (GGUF files name tensors their own way). A
        delta of another shape than its weight is a WeightsError (an adapter for another model)."""
        def fetch_merged(name: str) -> torch.Tensor:
            t = fetch(name)
            delta = self.deltas.get(hf_name(name))
            if delta is None:
                return t
            if tuple(delta.shape) != tuple(t.shape):
                raise WeightsError(self.path, f"B A is {tuple(delta.shape)} but the base weight is "
                                              f"{tuple(t.shape)} (an adapter for another model?)", tensor=hf_name(name))
            return (t.float() + delta).to(t.dtype)
        return fetch_merged


@dataclass
class LoraPairs:
    """An adapter read from a PEFT folder, unmerged: ``pairs`` maps an HF module path (``model.layers.0.
    self_attn.q_proj``) to (A [r, in], s B [out, r]) in fp32, the scale folded into B."""

    path: str
    config: LoraConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.pairs.values())

    def merged(self) -> LoraAdapter:
        """The adapter as weight deltas s B A (what ``--lora`` merges)."""
        return LoraAdapter(self.path, self.config, {f"{m}.weight": b @ a for m, (a, b) in self.pairs.items()})


def read_lora_pairs(folder: str | os.PathLike[str]) -> LoraPairs:
    """Read a PEFT LoRA adapter folder: each adapted module's A and scaled B (WeightsError naming the file
    and tensor for anything that is not a well-formed LoRA adapter)."""
    folder = os.fspath(folder)
    config = read_lora_config(folder)
    path, tensors = read_adapter_tensors(folder)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise WeightsError(path, "not a LoRA A / B weight in PEFT's naming "
                                     "(base_model.model.<module>.lora_A.weight)", tensor=key)
        found.setdefault(m["module"], {})[m["which"]] = value
    pairs = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise WeightsError(path, f"lora_{missing} is missing", tensor=f"{PREFIX}{module}.lora_{missing}.weight")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise WeightsError(path, f"lora_B {tuple(b.shape)} and lora_A {tuple(a.shape)} do not multiply "
                                     "(B must be out x r, A r x in)", tensor=f"{PREFIX}{module}.lora_A.weight")
        rank = config.rank(module)
        if a.shape[0] != rank:
            raise WeightsError(path, f"rank {a.shape[0]} but the config says r = {rank}",
                               tensor=f"{PREFIX}{module}.lora_A.weight")
        pairs[module] = (a.contiguous(), (config.scale(module) * b).contiguous())
    if not pairs:
        raise WeightsError(path, "the adapter holds no LoRA weights")
    return LoraPairs(folder, config, pairs)


def read_lora(folder: str | os.PathLike[str]) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder and compute each adapted weight's s B A."""
    return read_lora_pairs(folder).merged()
