"""EngineConfig: one validated, frozen description of how a model is loaded and served."""

from __future__ import annotations

import dataclasses

import pytest

from loom.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig


def test_options_replace_fields_and_unknown_ones_are_refused():
    base = EngineConfig(weights="fp32", cache=CacheConfig(block_size=8))
    cfg = EngineConfig.of(base, decode_step="module", scheduler=SchedulerConfig(max_num_seqs=4))
    assert (cfg.weights, cfg.cache.block_size, cfg.decode_step, cfg.scheduler.max_num_seqs) == ("fp32", 8, "module", 4)
    assert base.decode_step == "auto"  # the original is untouched
    with pytest.raises(TypeError, match="unknown engine option.*decode_graph"):
        EngineConfig.of(None, decode_graph=False)


@pytest.mark.parametrize("fields,match", [(dict(weights="fp16"), "weights must be one of"),
                                          (dict(decode_step="fast"), "decode_step must be one of"),
                                          (dict(num_threads=0), "num_threads"),
                                          (dict(cache=SchedulerConfig()), "cache must be a CacheConfig")])
def test_bad_fields_are_refused_clearly(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EngineConfig(**fields)


@pytest.mark.parametrize("config", [EngineConfig(), CacheConfig(), SchedulerConfig(), SpeculativeConfig("ngram")])
def test_configs_are_frozen(config):
    name = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, getattr(config, name))
