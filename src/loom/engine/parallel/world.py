"""The tensor-parallel world: N processes in one torch.distributed process group, rank 0 the engine's.

Two ways in, one code path after: ``loom`` itself starts ranks 1..N-1 on this machine (torch.multiprocessing,
spawned, rendezvous on a free loopback port), or ``torchrun`` started every rank on one or more machines and
set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (rendezvous over TCP). Every collective runs under the
configured timeout: a peer that dies fails the next collective at once (the connection closes) and one that
hangs fails it after the timeout, never hanging the engine.

Ranks join the group before they load the model; each then marks itself ready in the group's store (or
writes why it failed), and rank 0 waits for all of them with a deadline of its own (loading a large model may
take longer than one collective may).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from loom.config import ParallelConfig
from loom.layers.parallel import TPGroup

log = logging.getLogger("loom.parallel")

LOAD_DEADLINE_S = 1800.0  # how long rank 0 waits for every rank to load its shard


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a world torchrun (or another launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_launch(size: int) -> None:
    """Under torchrun, a ValueError unless the world it started has ``size`` ranks."""
    if not launched_by_torchrun():
        return
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(f"torchrun started a world of {world} processes (WORLD_SIZE, nnodes x nproc-per-node) but "
                         f"the tensor-parallel size is {size}: start exactly as many processes as "
                         "--tensor-parallel-size (e.g. torchrun --nnodes M --nproc-per-node K with M x K = N)")


def backend_for(parallel: ParallelConfig, device: str | torch.device | None) -> str:
    if parallel.backend is not None:
        return parallel.backend
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class World:
    """This process's rank in the world, and (on rank 0 of a world loom spawned) the worker processes."""

    rank: int
    size: int
    backend: str
    timeout_s: float
    torchrun: bool
    local_rank: int = 0
    processes: list[Any] = field(default_factory=list)

    @property
    def local_size(self) -> int:
        """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE, or every rank of a world loom spawned."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.size)) if self.torchrun else self.size

    @property
    def tp(self) -> TPGroup:
        return TPGroup(self.rank, self.size)

    def device(self, device: str | torch.device | None) -> torch.device | None:
        """This rank's device: ``cuda:<local rank>`` for CUDA, else the one given."""
        if device is not None and torch.device(device).type == "cuda":
            return torch.device("cuda", self.local_rank)
        return None if device is None else torch.device(device)

    def mark_ready(self, error: str | None = None) -> None:
        """Tell rank 0 this rank loaded its shard (or why it could not)."""
        _store().set(f"loom/ready/{self.rank}", "ok" if error is None else f"error: {error}")

    def wait_ready(self, deadline_s: float = LOAD_DEADLINE_S) -> None:
        """On rank 0: wait until every rank has loaded its shard; a RuntimeError naming the rank that failed,
        died or did not finish within the deadline."""
        store, end = _store(), time.monotonic() + deadline_s
        pending = set(range(1, self.size))
        while pending:
            for r in sorted(pending):
                key = f"loom/ready/{r}"
                if store.check([key]):
                    value = store.get(key).decode()
                    if value != "ok":
                        raise RuntimeError(f"tensor-parallel rank {r} could not load its shard: {value[7:]}")
                    pending.discard(r)
            for r, p in enumerate(self.processes, start=1):
                if r in pending and not p.is_alive():
                    raise RuntimeError(f"tensor-parallel worker rank {r} exited (status {p.exitcode}) while loading")
            if pending and time.monotonic() > end:
                raise RuntimeError(f"tensor-parallel ranks {sorted(pending)} did not load within {deadline_s:.0f} s")
            if pending:
                time.sleep(0.05)

    def close(self, join_s: float = 10.0) -> None:
        """Leave the process group; on rank 0, wait for spawned workers (ended after ``join_s``)."""
        for p in self.processes:
            p.join(join_s)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.processes = []
        if dist.is_initialized():
            dist.destroy_process_group()


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def init_rank(rank: int, size: int, backend: str, timeout_s: float, init_method: str, local_rank: int = 0,
              torchrun: bool = False) -> World:
    """Join the process group as ``rank`` (every collective under ``timeout_s``)."""
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed process group: one tensor-parallel "
                           "engine per process (close the other LLM first)")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return World(rank, size, backend, timeout_s, torchrun, local_rank)


def start_world(parallel: ParallelConfig, device: str | torch.device | None,
                worker: Callable[..., None], worker_args: tuple[Any, ...]) -> World:
    """Join torchrun's world, or (rank 0) spawn ranks 1..N-1 running ``worker(rank, size, backend, timeout,
    init_method, *worker_args)`` and join them."""
    size, timeout = parallel.tensor_parallel_size, parallel.timeout_s
    backend = backend_for(parallel, device)
    check_launch(size)
    if launched_by_torchrun():
        return init_rank(int(os.environ["RANK"]), size, backend, timeout, "env://",
                         int(os.environ.get("LOCAL_RANK", 0)), torchrun=True)
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    processes = []
    for rank in range(1, size):
        p = ctx.Process(target=worker, args=(rank, size, backend, timeout, init_method, *worker_args),
                        name=f"loom-tp-{rank}", daemon=True)
        p.start()
        processes.append(p)
    try:
        world = init_rank(0, size, backend, timeout, init_method)
    except BaseException:
        for p in processes:
            p.kill()
        raise
    world.processes = processes
    log.info("tensor parallel: %d ranks (%s), worker pids %s", size, backend, [p.pid for p in processes])
    return world
