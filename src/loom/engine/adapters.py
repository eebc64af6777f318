"""LoRA adapters served per request: a registry, host copies, and the slots a step computes from.

Each request may name an adapter (OpenAI's ``model`` field, ``LLM.generate(..., lora=name)``); the base
weights are never changed. Three tiers, as in S-LoRA (Sheng et al. 2023) and vLLM:

    registered   name -> PEFT folder, checked when added (rank, target modules, shapes)
    host         up to ``max_cpu_loras`` adapters' A and B in memory, least recently used dropped first
                 (read again from the folder when needed)
    slots        ``max_loras`` slots of the pool the kernels read (layers/multi_lora.py), filled least
                 recently used; a slot is pinned while a running sequence uses it

Every load of an adapter gets a fresh ``uid`` (its identity and load version): the prefix cache keys
blocks by it, so two adapters, or an adapter and its reloaded self, never share K/V.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loom.config import LoraServingConfig
from loom.errors import InvalidRequestError
from loom.layers.nf4 import NF4Linear
from loom.layers.quantized import PackedW8A8Linear, QuantizedLinear, W8A8Linear
from loom.layers.multi_lora import LayerLora, LoraHooks, LoraWeights
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.lora import LoraPairs, read_lora_pairs

# HF projection -> (loom's linear in a layer: 0 q|k|v, 1 o, 2 gate|up, 3 down; its part in that linear)
PROJECTIONS: dict[str, tuple[int, int]] = {
    "q_proj": (0, 0), "k_proj": (0, 1), "v_proj": (0, 2), "o_proj": (1, 0),
    "gate_proj": (2, 0), "up_proj": (2, 1), "down_proj": (3, 0),
}
_MODULE = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>\w+)$")
_uids = itertools.count(1)


def lora_dtype(model: Transformer, choice: str) -> torch.dtype:
    """The slots' dtype: ``choice``, or for "auto" bf16 when the decoder's linears are quantized, else the model's."""
    if choice != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]
    quantized = (QuantizedLinear, W8A8Linear, PackedW8A8Linear, NF4Linear)
    linears = [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.mlp.down_proj)]
    return torch.bfloat16 if any(isinstance(m, quantized) for m in linears) else model.dtype


class AdapterError(InvalidRequestError):
    """An adapter that cannot be served (unknown, duplicate, too high a rank, for another model)."""


@dataclass(eq=False)
class Adapter:
    """One load of a registered adapter. ``uid`` is unique per load (its prefix-cache identity)."""

    name: str
    path: str
    uid: int
    rank: int
    modules: tuple[str, ...]  # the HF modules it adapts
    linears: tuple[bool, bool, bool, bool]  # whether it adapts q|k|v, o, gate|up, down (in any layer)


class AdapterPool:
    """The adapters an engine serves, and the slot tensors its decode steps and hooks read."""

    def __init__(self, model: Transformer, config: LoraServingConfig) -> None:
        self.model = model
        self.config = config
        c = model.config
        if not c.gated_mlp:
            raise ValueError("per-request LoRA adapters need a model with a gated MLP (q|k|v, o, gate|up, down)")
        if c.num_experts:
            raise ValueError("per-request LoRA adapters are not served for mixture-of-experts models (their MLPs are "
                             "experts, not one gate|up and down)")
        if c.is_mla:
            raise ValueError("per-request LoRA adapters are not served for latent attention models (no q|k|v "
                             "projection)")
        self.rank = config.max_lora_rank
        self.dtype = lora_dtype(model, config.dtype)
        n, dt, dev = config.max_loras, self.dtype, model.device
        inter = c.intermediate_size

        def weights(parts: list[int], fan_in: int) -> LoraWeights:
            cols = [0]
            for p in parts:
                cols.append(cols[-1] + p)
            return LoraWeights(torch.zeros(n, len(parts) * self.rank, fan_in, dtype=dt, device=dev),
                               torch.zeros(n, cols[-1], self.rank, dtype=dt, device=dev), cols)

        self.layers: list[LayerLora] = [
            LayerLora(weights([c.q_size, c.kv_size, c.kv_size], c.hidden_size), weights([c.hidden_size], c.q_size),
                      weights([inter, inter], c.hidden_size), weights([c.hidden_size], inter))
            for _ in range(c.num_layers)]
        self.hooks = LoraHooks([(module, w, kind) for layer, lora in zip(model.layers, self.layers)
                                for kind, (module, w) in enumerate(zip((layer.attn.qkv_proj, layer.attn.o_proj,
                                                                        layer.mlp.gate_up_proj, layer.mlp.down_proj),
                                                                       lora))])
        self.registered: dict[str, Adapter] = {}
        self._host: OrderedDict[int, LoraPairs] = OrderedDict()  # uid -> pairs, most recent last
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # uid -> slot, most recent last
        self._pins: dict[int, int] = {}  # uid -> running sequences using its slot
        self._in_use: dict[int, Adapter] = {}  # uid -> the adapter, while pinned
        self.loads = 0  # adapters copied into slots (cache misses of the slot tier)
        for name, path in config.modules:
            self.add(name, path)

    # The registry ---------------------------------------------------------------------------------

    def add(self, name: str, path: str | os.PathLike[str], pairs: LoraPairs | None = None) -> Adapter:
        """Register the PEFT adapter at ``path`` as ``name``; AdapterError (HTTP 400) if it cannot be served.
        ``pairs``: the folder already read by ``read`` (a server reads it off the engine's thread)."""
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        if name in self.registered:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        path = os.fspath(path)
        pairs = pairs if pairs is not None else self.read(name, path)
        kinds = {self._locate(m)[1] for m in pairs.pairs}  # type: ignore[index]
        adapter = Adapter(name, path, next(_uids), max(a.shape[0] for a, _ in pairs.pairs.values()),
                          tuple(sorted(pairs.pairs)), tuple(k in kinds for k in range(4)))  # type: ignore[arg-type]
        self.registered[name] = adapter
        self._keep_on_host(adapter.uid, pairs)
        return adapter

    def remove(self, name: str) -> Adapter:
        """Unregister ``name``: new requests for it are refused; sequences already using it finish."""
        adapter = self.registered.pop(name, None)
        if adapter is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        if not self._pins.get(adapter.uid):
            self._drop(adapter.uid)
        return adapter

    def get(self, name: str) -> Adapter:
        adapter = self.registered.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.registered)) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {known})", param="model")
        return adapter

    def read(self, name: str, path: str) -> LoraPairs:
        """The adapter's pairs, checked against the model and the slots; AdapterError saying what is wrong.
        It changes nothing, so it may run on any thread."""
        try:
            pairs = read_lora_pairs(path)
        except WeightsError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        for module, (a, b) in pairs.pairs.items():
            where = self._locate(module)
            if where is None:
                raise AdapterError(f"adapter {name!r} adapts {module}, which is not a decoder projection loom serves "
                                   f"adapters on ({', '.join(PROJECTIONS)} of layers 0..{len(self.layers) - 1})")
            layer, linear, part = where
            w = self.layers[layer][linear]
            rows, fan_in = w.cols[part + 1] - w.cols[part], w.a.shape[2]
            if a.shape[0] > self.rank:
                raise AdapterError(f"adapter {name!r} has rank {a.shape[0]} at {module}, above --max-lora-rank "
                                   f"{self.rank}")
            if a.shape[1] != fan_in or b.shape[0] != rows:
                raise AdapterError(f"adapter {name!r}: {module} is {tuple(b.shape[:1]) + tuple(a.shape[1:])} "
                                   f"(out, in) but the model's is ({rows}, {fan_in}): an adapter for another model")
        return pairs

    def _locate(self, module: str) -> tuple[int, int, int] | None:
        m = _MODULE.match(module)
        if m is None or m["proj"] not in PROJECTIONS or int(m["layer"]) >= len(self.layers):
            return None
        return (int(m["layer"]), *PROJECTIONS[m["proj"]])

    # Host copies ----------------------------------------------------------------------------------

    def _keep_on_host(self, uid: int, pairs: LoraPairs) -> None:
        self._host[uid] = pairs
        self._host.move_to_end(uid)
        while len(self._host) > self.config.host_capacity:
            self._host.popitem(last=False)

    def _pairs(self, adapter: Adapter) -> LoraPairs:
        pairs = self._host.get(adapter.uid)
        if pairs is None:  # dropped from host memory: read it again
            pairs = self.read(adapter.name, adapter.path)
            self._keep_on_host(adapter.uid, pairs)
        else:
            self._host.move_to_end(adapter.uid)
        return pairs

    # Slots ----------------------------------------------------------------------------------------

    def slot(self, adapter: Adapter) -> int | None:
        """The adapter's slot if it has one."""
        return self._slot_of.get(adapter.uid)

    def can_acquire(self, adapter: Adapter) -> bool:
        """Whether ``acquire`` would succeed now (resident, or a slot is free or unpinned)."""
        return adapter.uid in self._slot_of or len(self._slot_of) < self.config.max_loras or any(
            not self._pins.get(uid) for uid in self._slot_of)

    def acquire(self, adapter: Adapter) -> int:
        """Pin the adapter's slot for one more running sequence, loading it into the least recently used
        unpinned slot if it has none. RuntimeError if every slot is pinned (check ``can_acquire``)."""
        slot = self._slot_of.get(adapter.uid)
        if slot is None:
            if len(self._slot_of) < self.config.max_loras:
                slot = min(set(range(self.config.max_loras)) - set(self._slot_of.values()))
            else:
                victim = next((uid for uid in self._slot_of if not self._pins.get(uid)), None)
                if victim is None:
                    raise RuntimeError("every adapter slot is in use by running sequences")
                slot = self._slot_of.pop(victim)
            self._write(slot, self._pairs(adapter))
            self._slot_of[adapter.uid] = slot
            self.loads += 1
        self._slot_of.move_to_end(adapter.uid)
        self._pins[adapter.uid] = self._pins.get(adapter.uid, 0) + 1
        self._in_use[adapter.uid] = adapter
        return slot

    def release(self, adapter: Adapter) -> None:
        """One running sequence stopped using the adapter's slot (finished, preempted or aborted)."""
        left = self._pins.get(adapter.uid, 0) - 1
        if left > 0:
            self._pins[adapter.uid] = left
            return
        self._pins.pop(adapter.uid, None)
        self._in_use.pop(adapter.uid, None)
        if self.registered.get(adapter.name) is not adapter:  # unloaded while in flight: free it now
            self._drop(adapter.uid)

    def _drop(self, uid: int) -> None:
        self._host.pop(uid, None)
        self._slot_of.pop(uid, None)  # its slot's tensors are overwritten by the next load

    @property
    def active(self) -> list[str]:
        """Names of adapters in use by running sequences (unloaded ones still finishing included)."""
        return sorted({a.name for a in self._in_use.values()})

    def _write(self, slot: int, pairs: LoraPairs) -> None:
        """Copy an adapter into ``slot``: each part's A into its rows, s B into its columns, zeros elsewhere."""
        r = self.rank
        for layer in self.layers:
            for w in layer:
                w.a[slot].zero_()
                w.b[slot].zero_()
        for module, (a, b) in pairs.pairs.items():
            layer, linear, part = self._locate(module)  # type: ignore[misc]
            w = self.layers[layer][linear]
            k = a.shape[0]
            w.a[slot, part * r:part * r + k].copy_(a)
            w.b[slot, w.cols[part]:w.cols[part + 1], :k].copy_(b)
