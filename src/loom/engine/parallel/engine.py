"""Rank 0 of a tensor-parallel world: the one ``LLMEngine`` (scheduler, block manager, sampler, tokenizer),
whose model forwards, logits and KV block copies are commands every rank executes on its shard.

Only the module step runs under tensor parallelism: the compiled steps (scripted, native, CUDA graphs)
cannot call collectives. ``describe()`` says so, and what each rank holds.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from loom.config import EngineConfig
from loom.engine.engine import LLMEngine
from loom.engine.kv_cache import KVCache
from loom.engine.parallel.channel import Channel
from loom.engine.parallel.worker import ShardExecutor
from loom.engine.parallel.world import World
from loom.engine.runner import ModelRunner
from loom.engine.step import DecodeBatch, ModuleStep
from loom.layers.attention import AttentionMetadata
from loom.models.tensor_parallel import shard_config
from loom.models.transformer import Transformer
from loom.tokenizer import Tokenizer

log = logging.getLogger("loom.parallel")


class ChannelKVCache(KVCache):
    """Rank 0's KV cache shard: block copies (copy-on-write) are made on every rank's shard."""

    channel: Channel  # set by ParallelEngine once the cache exists

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            with self.channel.command("copy", copies):
                super().copy_blocks(copies)


class ParallelModuleStep(ModuleStep):
    """The module step on rank 0, each call a command every rank runs on its shard."""

    def __init__(self, executor: ShardExecutor, channel: Channel) -> None:
        step = executor.step
        assert step is not None
        super().__init__(step.model, step.caches)
        self.executor, self.channel = executor, channel

    def describe(self) -> str:
        ranks = self.channel.world.size
        if self.executor.fast is not None:
            return (f"scripted (tensor parallel over {ranks} ranks: each rank's shard, the all-reduces inside the "
                    "TorchScript program) > module")
        return f"module (tensor parallel over {ranks} ranks; this model takes no compiled step)"

    def forward(self, ids: torch.Tensor, meta: AttentionMetadata, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        if meta.evicting:
            raise ValueError("KV eviction policies are not supported under tensor parallelism")
        payload = (ids.cpu(), meta.to("cpu"), None if lora_slots is None else lora_slots.cpu())
        with self.channel.command("forward", payload):
            return self.executor.run("forward", payload)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        payload = hidden.cpu()
        with self.channel.command("logits", payload):
            return self.executor.run("logits", payload)

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        with self.channel.command("decode", batch):
            return self.executor.run("decode", batch)


class ParallelModel:
    """The model as code outside the engine sees it on rank 0 (the embedder): its config and device, and a
    forward that is a command (every rank runs its shard; without cache writes for uncached metadata)."""

    def __init__(self, step: ParallelModuleStep) -> None:
        self.step = step
        self.config = step.model.config
        self.device = step.model.device
        self.dtype = step.model.dtype

    def __call__(self, ids: torch.Tensor, meta: AttentionMetadata, kv_caches: Any = None) -> torch.Tensor:
        return self.step.forward(ids, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.step.logits(hidden)


class ParallelEngine(LLMEngine):
    """``LLMEngine`` on rank 0 of ``world``, over rank 0's shard of ``model`` (cut already)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig, world: World) -> None:
        self.world = world
        self.channel = Channel(world, config.parallel.heartbeat)
        self.executor = ShardExecutor(model, world, ChannelKVCache)
        super().__init__(model, tokenizer, config)
        self._embedding_model = ParallelModel(self.runner.module)  # type: ignore[arg-type]

    @property
    def embedding_model(self) -> Any:
        return self._embedding_model

    def _make_kv_cache(self, config: EngineConfig, context: int) -> KVCache:
        """Rank 0 sizes the cache by its shard's bytes per block; every rank allocates that many blocks."""
        shard = shard_config(self.model.config, self.world.size)
        n = KVCache.blocks_for(shard, config.cache, self.model.dtype, self.model.device, context)
        if config.cache.num_blocks is None and config.cache.memory_bytes is None and self.model.device.type == "cpu":
            n = max(1, n // self.world.local_size)  # the ranks on this host share its memory budget
        payload = (n, config.cache.block_size, self.model.dtype)
        with self.channel.command("kv", payload):
            kv = self.executor.run("kv", payload)
        kv.channel = self.channel
        return kv

    def _build_runner(self, config: EngineConfig) -> ModelRunner:
        runner = ModelRunner(self.model, self.kv_cache, "module", max_batch=config.scheduler.max_num_seqs)
        step = ParallelModuleStep(self.executor, self.channel)
        runner.steps = runner._preferred = [step]
        runner.module = step
        return runner

    def describe(self) -> str:
        """Also what rank 0 holds (every rank holds as much, but for an uneven last vocabulary shard)."""
        mem = self.executor.memory()
        mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        return (f"tensor parallel: {self.world.size} ranks ({self.world.backend}), rank 0 holds {mib(mem['sharded'])} "
                f"of sharded weights + {mib(mem['replicated'])} replicated (norms, RoPE tables) + "
                f"{mib(mem['kv_cache'])} of KV cache shard{self._pids()}; {super().describe()}")

    def _pids(self) -> str:
        pids = [p.pid for p in self.world.processes]
        return f", worker pids {pids}" if pids else ""

    def health_problem(self) -> str | None:
        return self.channel.failure

    def rank_memory(self) -> list[dict[str, Any]]:
        """Every rank's bytes: ``sharded`` and ``replicated`` weights (and the replicated parts by name), and
        ``kv_cache`` (``models/tensor_parallel.rank_memory``)."""
        return self.channel.gather("memory", self.executor.memory())

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self.channel.close()
        self.world.close()
