"""What every rank runs: load the model, cut its shard, and execute commands (``ShardExecutor``); ranks 1..N-1
do nothing else (``serve_commands``), rank 0 runs the same executor under the engine (engine.py).

Commands (names broadcast by rank 0's ``Channel``):
    kv       allocate this rank's KV cache shard: (num_blocks, block_size, dtype)
    forward  the module forward of a flat batch (prefill chunks and decodes): (ids, AttentionMetadata, None)
    logits   the output layer over hidden rows rank 0 chose: hidden [n, hidden]
    decode   a decode batch (one new token per row, drafts being verified included): forward + logits
    copy     copy-on-write KV block copies [(src, dst), ...]
    memory   every rank's tensor bytes, gathered on rank 0
    ping     the heartbeat: a one-element all-reduce
    stop     leave the loop
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from loom.config import EngineConfig, ModelConfig
from loom.engine.kv_cache import KVCache
from loom.engine.parallel.channel import receive
from loom.engine.parallel.world import World, init_rank
from loom.engine.step import DecodeStep, ModuleStep, ScriptedStep, llama_shaped
from loom.layers.attention import Attention
from loom.models.tensor_parallel import rank_memory, shard_config, shard_problem, shard_transformer
from loom.models.transformer import Transformer

log = logging.getLogger("loom.parallel")


def engine_problem(config: EngineConfig) -> str | None:
    """Why the engine options cannot run tensor-parallel (None: they can)."""
    if config.decode_step not in ("auto", "module"):
        return (f"decode step {config.decode_step!r} cannot be chosen under tensor parallelism: every rank runs the "
                "scripted step over its shard where it takes the model (the all-reduces inside its program), else "
                "the module step; use --decode-step auto or module")
    if config.weights == "int8":
        return "W8A8 int8 weights (weights='int8') are not supported under tensor parallelism"
    if config.cache.kv_dtype == "int8":
        return "the int8 KV cache is not supported under tensor parallelism (use kv_dtype 'auto')"
    if config.kv_policy is not None and config.kv_policy.bounded:
        return "KV eviction policies are not supported under tensor parallelism"
    if config.lora_serving is not None:
        return "per-request LoRA adapters are not supported under tensor parallelism (merge the adapter: --lora)"
    return None


def load_rank_model(model_path: str, config: EngineConfig, device: torch.device | None) -> Any:
    """The whole model as ``LLM`` loads it (each rank reads the file, then cuts its shard)."""
    from loom.weights.loader import choose_weights, load_model

    weights, dtype = choose_weights(config.weights, config.dtype, config.device, dense=config.lora is not None)
    return load_model(model_path, dtype=dtype, kernel=config.attention_kernel, weights=weights,
                      device=device if device is not None else config.device, rope_scaling=config.rope_scaling,
                      lora=config.lora)


def check_model(model_config: ModelConfig, size: int) -> None:
    from loom.layers.parallel import ShardingError

    problem = shard_problem(model_config, size)
    if problem is not None:
        raise ShardingError(f"cannot run {model_config.name or model_config.architecture} with tensor parallelism "
                            f"{size}: {problem}")


class ShardExecutor:
    """One rank's shard of the model and of the KV cache, and what each command does with them."""

    def __init__(self, model: Transformer, world: World, kv_class: type[KVCache] = KVCache) -> None:
        self.model, self.world, self.kv_class = model, world, kv_class
        self.kv: KVCache | None = None
        self.step: ModuleStep | None = None
        self.fast: DecodeStep | None = None  # the scripted step over this shard, where it takes the model
        self.fast_batches = 0  # decode batches it ran

    @torch.inference_mode()
    def run(self, name: str, payload: Any) -> Any:
        if name == "kv":
            num_blocks, block_size, dtype = payload
            config = shard_config(self.model.config, self.world.size)
            self.kv = self.kv_class(config, num_blocks, block_size, dtype, device=self.model.device)
            self.step = ModuleStep(self.model, self.kv.layers())
            self.fast = compiled_step(self.model, self.kv, self.world)
            return self.kv
        if name == "forward":
            ids, meta, lora = payload
            return self.step.forward(ids, meta, lora)  # type: ignore[union-attr]
        if name == "logits":
            return self.step.logits(payload.to(self.model.device))  # type: ignore[union-attr]
        if name == "decode":  # every rank makes the same choice: the same shard structure, the same batch
            if self.fast is not None and self.fast.supports(payload):
                self.fast_batches += 1
                return self.fast(payload)
            return self.step(payload)  # type: ignore[misc]
        if name == "copy":
            KVCache.copy_blocks(self.kv, payload)  # type: ignore[arg-type]
            return None
        if name == "ping":
            dist.all_reduce(torch.zeros(1, device=self.model.device))
            return None
        if name == "memory":
            return self.memory()
        raise ValueError(f"unknown tensor-parallel command {name!r}")

    def memory(self) -> dict[str, Any]:
        mem = rank_memory(self.model)
        mem["kv_cache"] = 0 if self.kv is None else self.kv.nbytes
        return mem


def compiled_step(model: Transformer, kv: KVCache, world: World) -> DecodeStep | None:
    """The scripted decode step over this rank's shard, its o and down projections all-reduced inside the program
    (TorchScript compiles torch.distributed's functional collectives), or None where it does not take the model
    (not Llama-shaped, a GPU, an int8 cache): decode batches then run the module step."""
    if world.size == 1 or model.device.type != "cpu" or kv.quantized or not llama_shaped(model):
        return None
    if not all(isinstance(l.attn, Attention) for l in model.layers):
        return None
    group = dist.group.WORLD.group_name  # type: ignore[union-attr]
    return ScriptedStep(model, kv.k, kv.v, tp_group=group)


def serve_commands(executor: ShardExecutor) -> None:
    """A worker's life after loading: execute rank 0's commands until "stop" (returns) or until rank 0 is
    gone or the group fails (raises)."""
    while True:
        name, payload = receive()
        if name == "stop":
            return
        if name == "memory":
            dist.gather_object(executor.memory(), None, dst=0)
            continue
        executor.run(name, payload)


def worker_main(rank: int, size: int, backend: str, timeout_s: float, init_method: str, config: EngineConfig,
                model_path: str) -> None:
    """A spawned worker (ranks 1..N-1 of a world loom started): join, load, cut, serve; exit 1 on failure."""
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s loom-tp rank {rank}: %(message)s")
    torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // size))
    world = init_rank(rank, size, backend, timeout_s, init_method, local_rank=rank)
    sys.exit(run_worker(world, config, model_path))


def run_worker(world: World, config: EngineConfig, model_path: str, model: Transformer | None = None) -> int:
    """Load (unless ``model`` is given) and cut this rank's shard, mark it ready, serve commands; the exit status."""
    try:
        if model is None:
            model = load_rank_model(model_path, config, world.device(config.device)).model
        check_model(model.config, world.size)
        shard_transformer(model, world.tp)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
        world.mark_ready(f"{type(e).__name__}: {e}")
        raise
    world.mark_ready()
    try:
        serve_commands(ShardExecutor(model, world))
    except Exception as e:  # noqa: BLE001 - rank 0 is gone or the group failed: say so and exit non-zero
        print(f"loom: tensor-parallel rank {world.rank} lost contact with rank 0 and exits: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    finally:
        world.processes = []
    world.close()
    return 0
