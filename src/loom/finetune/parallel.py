"""Data-parallel fine-tuning over ``torch.distributed``: DistributedDataParallel and FSDP (gloo on the CPU).

DDP (Li et al. 2020, "PyTorch Distributed"): every rank holds the whole model, runs its slice of each global
batch, and the gradients are all-reduced (averaged over the W ranks) during the backward, so every rank
takes the same optimizer step. FSDP (ZeRO-3, Rajbhandari et al. 2020; PyTorch's FSDP2 ``fully_shard``):
each parameter, its gradient and its optimizer state are split along dim 0 across the ranks; a decoder
layer's parameters are all-gathered before its forward and backward, and its gradients reduce-scattered
(averaged) after, so a rank keeps about 1/W of the parameters and of AdamW's two moments.

Exactness. One process trained on the global batch minimizes L = (1/N) sum_i l_i over the batch's N
predicted tokens. Rank r holds the tokens I_r of its slice and returns L_r = (W / N) sum_{i in I_r} l_i
(N is the all-reduced sum of the ranks' counts); averaging the gradients gives (1/W) sum_r grad L_r =
grad L exactly. Averaging each rank's own mean instead would weight a token by 1/(W |I_r|): wrong as soon
as the ranks hold different numbers of trained tokens (masked chat prompts, windows of other lengths).
The data order is every rank's: each draws the same global batches (same seed) and keeps its contiguous
slice, so W ranks with ``batch_size`` each see exactly the batches of one rank with ``W x batch_size``.

Launch: ``spawn`` starts W processes on a local rendezvous (127.0.0.1, a free port) with torchrun's
environment variables, and each joins through ``world_from_env``, as a process that torchrun started does.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from loom.finetune.train import LossFn, Sequences, lm_loss, predicted_tokens
from loom.models.transformer import Transformer

STRATEGIES = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (rank 0 of 1: a single process)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, in place (the identity for one process)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def mean_and_sum(self, share: float, count: int) -> tuple[float, int]:
        """(the global mean loss from each rank's ``share`` of W x it, the sum of ``count``) over the ranks."""
        if self.size == 1:
            return share, count
        t = torch.tensor([share, float(count)], dtype=torch.float64)
        self.all_reduce(t)
        return float(t[0]) / self.size, int(t[1])

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def world_from_env(backend: str = "gloo") -> World | None:
    """The world torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joined (the process group
    initialized unless it already is); None when this process was not started as a rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size)
    return World(dist.get_rank(), dist.get_world_size())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, threads: int | None = None) -> None:
    """Run ``fn(world, *args)`` in ``nproc`` new processes that form one world on this machine; ``threads``
    per process (default: this process's torch threads divided among them). Raises if a rank fails."""
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"nproc must be positive, got {nproc}")
    threads = threads or max(1, torch.get_num_threads() // nproc)
    mp.spawn(_rank_main, args=(nproc, free_port(), threads, fn, args), nprocs=nproc, join=True)


def _rank_main(rank: int, nproc: int, port: int, threads: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
    torch.set_num_threads(threads)
    world = world_from_env()
    assert world is not None
    fn(world, *args)
    # Only after success: a rank that raised exits at once and spawn stops the others, where a barrier
    # in a finally clause would wait forever for it.
    dist.barrier()
    dist.destroy_process_group()


def shard(batch: Sequence[T], world: World) -> list[T]:
    """This rank's contiguous slice of a global batch (its length a multiple of the world's size)."""
    if len(batch) % world.size:
        raise ValueError(f"a global batch of {len(batch)} does not split evenly over {world.size} ranks")
    per = len(batch) // world.size
    return list(batch[world.rank * per:(world.rank + 1) * per])


def rank_batches(batches: Iterable[Sequence[T]], world: World) -> Iterator[list[T]]:
    for batch in batches:
        yield shard(batch, world)


class TokenLossSum(nn.Module):
    """The summed cross-entropy of a batch's predicted tokens (``lm_loss(..., reduction="sum")``) as a
    module: what DDP or FSDP wraps, so everything the loss touches (the output layer too) runs inside the
    wrapped forward, where FSDP gathers the parameters and DDP prepares the gradient all-reduce."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Sequences, labels: Sequences | None = None) -> torch.Tensor:
        return lm_loss(self.model, input_ids, labels, reduction="sum")


def wrap(model: Transformer, strategy: str, world: World) -> nn.Module:
    """A ``TokenLossSum`` of ``model`` under DDP, or sharded by FSDP2 (each decoder layer a unit, the
    embedding, final norm and output layer the root's); with FSDP ``model``'s parameters become DTensor
    shards in place, so take the trainable parameters after this."""
    module = TokenLossSum(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # the buffers (RoPE tables) are the same on every rank: nothing to broadcast each step
        return DistributedDataParallel(module, forward_sync_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world.size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"unknown data-parallel strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def data_parallel_loss(wrapped: nn.Module, world: World) -> LossFn:
    """train()'s loss in a world: this rank's share W / N x (its summed token losses), N all-reduced."""

    def loss(model: Transformer, input_ids: Sequences, labels: Sequences | None = None) -> torch.Tensor:
        count = world.all_reduce(torch.tensor(predicted_tokens(input_ids, labels), dtype=torch.int64))
        return wrapped(input_ids, labels) * (world.size / max(1, int(count)))

    return loss


def mean_loss(wrapped: nn.Module) -> LossFn:
    """The mean token loss of a batch through the wrapped module (every rank evaluates the same batch:
    FSDP's forward is a collective)."""

    def loss(model: Transformer, input_ids: Sequences, labels: Sequences | None = None) -> torch.Tensor:
        out = wrapped(input_ids, labels) / max(1, predicted_tokens(input_ids, labels))
        if hasattr(wrapped, "reshard"):
            # FSDP keeps the root's parameters gathered after its forward (the backward would need them
            # at once); with no backward they would stay gathered, and the next training forward would
            # use that copy, stale once the optimizer has stepped the shards.
            wrapped.reshard()
        return out

    return loss


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t`` (a DTensor: its local shard, padding excluded)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def full_bytes(t: torch.Tensor) -> int:
    """Bytes of the whole tensor (a DTensor's global shape)."""
    return t.numel() * t.element_size()


@dataclass
class RankMemory:
    """What one rank holds between steps: its parameters and AdamW's state (FSDP: its shards), against
    the whole model's, which a single process (or each DDP rank) holds."""

    rank: int
    parameter_bytes: int
    trainable_bytes: int
    optimizer_state_bytes: int
    full_parameter_bytes: int
    full_optimizer_state_bytes: int
    peak_rss_bytes: int | None = None

    @property
    def fraction(self) -> float:
        """(parameters + optimizer state) held here / the unsharded total."""
        return (self.parameter_bytes + self.optimizer_state_bytes) / (
            self.full_parameter_bytes + self.full_optimizer_state_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fraction_of_one_rank": self.fraction}


def rank_memory(module: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                peak_rss_bytes: int | None = None) -> RankMemory:
    """Measure ``RankMemory`` from the tensors themselves (each distinct parameter once; tied ones once)."""
    params = list({id(p): p for p in module.parameters()}.values())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return RankMemory(rank, sum(local_bytes(p) for p in params),
                      sum(local_bytes(p) for p in params if p.requires_grad),
                      sum(local_bytes(v) for v in state), sum(full_bytes(p) for p in params),
                      sum(full_bytes(v) for v in state), peak_rss_bytes)


def full_trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the whole tensor of every trainable parameter (FSDP: all-gathered; every rank must call it)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for name, p in module.named_parameters() if p.requires_grad}
