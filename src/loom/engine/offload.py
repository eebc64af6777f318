"""Loading a decoder under a memory budget: measure what must be resident, plan (engine/budget.py), load the
resident layers and stream the others (weights/streaming.py).

    1. everything but the decoder layers is loaded (``load_model(decoder_layers=False)``) and measured
    2. layer 0 is read and built once to measure a built layer; the others are taken to be as large per byte
       of the file (decoder layers of one model share a shape)
    3. the KV cache is sized (``cache.num_blocks`` or ``memory_bytes`` as given, else ``memory_fraction`` of
       the budget), and a draft model of speculative decoding is loaded and measured
    4. the plan: resident layers are read and built now, the others stream from here on

The engine then runs decode batches through the module step (layer by layer), since the compiled steps
hold pointers to every layer's weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from loom.config import EngineConfig, SpeculativeConfig
from loom.engine.budget import BudgetError, ResidencyPlan, plan_residency
from loom.engine.kv_cache import KVCache
from loom.weights.loader import LoadedModel, limit_malloc_arenas, load_model, release_freed_memory
from loom.weights.streaming import LayerStream, module_bytes

log = logging.getLogger("loom.engine")


@dataclass
class Offload:
    """A model under a memory budget: its plan and the stream of its non-resident layers (None: all fit)."""

    plan: ResidencyPlan
    stream: LayerStream | None

    def describe(self) -> str:
        text = self.plan.describe()
        return text if self.stream is None else f"{text}; {self.stream.describe()}"

    def stats(self) -> dict[str, Any]:
        return {} if self.stream is None else self.stream.stats.as_dict()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def load_offloaded(path: str, config: EngineConfig, weights: str | None,
                   dtype: str | torch.dtype) -> tuple[LoadedModel, Offload, EngineConfig]:
    """The model at ``path`` loaded under ``config.memory_budget`` (module doc); returns it, its Offload and
    the engine config to serve it with (the KV cache's blocks fixed, a draft model loaded)."""
    budget = int(config.memory_budget)  # type: ignore[arg-type]
    limit_malloc_arenas(2)  # the stream's threads would each keep an arena of freed pages
    loaded = load_model(path, dtype=dtype, kernel=config.attention_kernel, weights=weights, device=config.device,
                        rope_scaling=config.rope_scaling, decoder_layers=False)
    model, sources = loaded.model, loaded.layer_sources
    assert sources is not None
    stream = LayerStream(model, sources, buffers=config.stream_buffers)
    try:
        base = module_bytes(model)
        first = stream.load(0)
        file_bytes = [stream.builder.file_bytes(i) for i in range(loaded.config.num_layers)]
        first_bytes = module_bytes(first, besides=model)  # the rotary tables it shares are the model's
        layer_bytes = [first_bytes] + [int(first_bytes / file_bytes[0] * b) for b in file_bytes[1:]]
        config, kv_bytes, kv_fraction = _size_kv_cache(config, loaded, budget)
        config, draft_bytes = _load_draft(config)
        plan = plan_residency(budget, base, layer_bytes, file_bytes, kv_bytes, draft_bytes, config.stream_buffers,
                              stream.read_buffer_bytes, kv_fraction)
        for i in plan.resident_layers:
            model.layers[i] = first if i == 0 else stream.load(i)
        del first
        if plan.streaming:
            stream.start(plan.streamed_layers)
        else:
            stream.close()
        release_freed_memory()
    except BaseException:
        stream.close()
        raise
    offload = Offload(plan, stream if plan.streaming else None)
    log.info("%s", offload.describe())
    return loaded, offload, config


def _kv_block_bytes(config: EngineConfig, loaded: LoadedModel) -> int:
    return KVCache.bytes_per_block(loaded.config, config.cache.block_size, loaded.model.dtype, config.cache.kv_dtype)


def _size_kv_cache(config: EngineConfig, loaded: LoadedModel, budget: int) -> tuple[EngineConfig, int, float | None]:
    """The engine config with the KV cache's blocks fixed: as ``cache`` says, or ``memory_fraction`` of the
    budget when it names no size; (config, KV bytes, that fraction or None)."""
    cache = config.cache
    per_block = _kv_block_bytes(config, loaded)
    fraction = None
    if cache.num_blocks is not None:
        blocks = cache.num_blocks
    elif cache.memory_bytes is not None:
        blocks = cache.memory_bytes // per_block
    else:
        fraction = cache.memory_fraction
        blocks = max(1, int(fraction * budget) // per_block)  # a budget too small for it is refused by the plan
    if blocks < 1:
        raise BudgetError(f"the KV cache under a memory budget of {budget / 1e6:.1f} MB holds no block (one block "
                          f"of {cache.block_size} tokens is {per_block} bytes): give a larger budget, or the KV "
                          "cache's size (--kv-cache-memory)")
    return replace(config, cache=replace(cache, num_blocks=blocks)), blocks * per_block, fraction


def _load_draft(config: EngineConfig) -> tuple[EngineConfig, int]:
    """A draft model is resident and counts against the budget: load it now (the engine takes it loaded) and
    measure it with its KV cache (as many blocks as the target's). (config, its bytes; 0 without one)."""
    spec: SpeculativeConfig | None = config.speculative
    if spec is None or spec.method != "draft":
        return config, 0
    from loom.engine.speculative.speculator import load_draft_model

    draft = load_draft_model(spec, torch.device("cpu"))
    kv = KVCache.bytes_per_block(draft.config, config.cache.block_size, draft.dtype) * config.cache.num_blocks
    return replace(config, speculative=replace(spec, draft_model=draft)), module_bytes(draft) + kv
