"""``start_parallel``: how ``LLM`` enters a tensor-parallel world. The same code under both launchers:

    loom alone    this process is rank 0: it loads the model and checks it can be cut (before starting
                  anything), spawns ranks 1..N-1 (each loads and cuts its own shard), cuts its shard
    torchrun      every process runs the same command; rank 0 returns here and runs the engine, the other
                  ranks load, cut, serve rank 0's commands and exit (SystemExit) when it stops
"""

from __future__ import annotations

import atexit
import os
from dataclasses import replace
from typing import Any

import torch

from loom.config import EngineConfig
from loom.engine.parallel.worker import check_model, engine_problem, load_rank_model, run_worker, worker_main
from loom.engine.parallel.world import World, check_launch, launched_by_torchrun, start_world
from loom.models.tensor_parallel import shard_transformer


def start_parallel(model_path: str, config: EngineConfig) -> tuple[Any, World]:
    """(rank 0's loaded model, cut to its shard; the world). On torchrun's other ranks this never returns."""
    size = config.parallel.tensor_parallel_size
    check_launch(size)
    problem = engine_problem(config)
    if problem is not None:
        raise ValueError(f"tensor parallelism {size}: {problem}")
    if config.num_threads is None and (config.device is None or torch.device(config.device).type == "cpu"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))  # the ranks share this machine's cores
    worker_config = replace(config, speculative=None)  # drafts are rank 0's alone
    if launched_by_torchrun():
        world = start_world(config.parallel, config.device, worker_main, ())
        if world.rank != 0:
            raise SystemExit(run_worker(world, worker_config, model_path))
        try:
            loaded = load_rank_model(model_path, config, world.device(config.device))
            check_model(loaded.config, size)
        except BaseException as e:
            world.mark_ready(f"{type(e).__name__}: {e}")
            world.close(join_s=0)
            raise
    else:
        loaded = load_rank_model(model_path, config, None)
        check_model(loaded.config, size)  # before any process starts
        world = start_world(config.parallel, config.device, worker_main, (worker_config, model_path))
    try:
        shard_transformer(loaded.model, world.tp)
        world.wait_ready()
    except BaseException:
        world.close(join_s=1.0)
        raise
    return loaded, world


def stop_at_exit(engine: Any) -> None:
    """Stop ``engine``'s workers when this process exits (if nothing stopped them before)."""
    atexit.register(engine.shutdown)
