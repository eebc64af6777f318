"""Measure all-reduce on this machine: gloo between processes over the loopback interface, the link a
CPU tensor-parallel run of loom on one machine would use; then fit the alpha-beta model to it.

``measure_allreduce`` times messages of a few sizes (the best and the median of ``repeats`` all-reduces
per size, every rank starting together after a barrier) and the all-reduces of one tensor-parallel
decode step (2 per layer of [tokens, hidden] fp32 activations, back to back, as the step issues them).
The fit and the comparison use the best times: on a shared machine (this one has 2 cores) the best run
is the one that found the cores free, as ``probe.py`` reasons; the medians are kept to show the spread.
``fit_link`` solves the least-squares line t = a + b m over the sizes and reads alpha = a / (2 (N - 1)),
beta = 2 (N - 1) / (N b) from it (``parallel.allreduce_time``). gloo picks its own algorithm by size;
with 2 ranks every algorithm is one exchange each way, which is what the ring formula describes.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from loom.analysis.parallel import allreduce_time
from loom.analysis.presets import Link

DEFAULT_SIZES = (256, 2048, 16384, 131072, 1048576)  # bytes


@dataclass
class AllReduceMeasurement:
    """Best seconds per all-reduce by message bytes, and of one decode step's all-reduces (with medians)."""

    ranks: int
    sizes: list[int]
    seconds: list[float]  # best of repeats
    median_seconds: list[float]
    step_allreduces: int  # all-reduces in the decode step timed
    step_bytes: int  # each one's message
    step_seconds: float  # all of them, best of step repeats
    step_median_seconds: float
    repeats: int
    link: Link | None = field(default=None)

    def fit(self) -> Link:
        self.link = fit_link(self.sizes, self.seconds, self.ranks)
        return self.link

    def train_link(self, median: bool = False) -> Link:
        """The link whose alpha is calibrated on the back-to-back train of a decode step's all-reduces (beta from
        the size fit): on this 2-core VM an all-reduce right after a barrier costs ~90 us, but one in a train of
        60 costs ~0.6 ms (each needs both processes and gloo's threads scheduled; the wake-ups dominate), so the
        isolated fit predicts a step's communication 7x short. ``median``: from the train's median time."""
        base = self.link or self.fit()
        per_call = (self.step_median_seconds if median else self.step_seconds) / self.step_allreduces
        steps = 2 * (self.ranks - 1)
        alpha = max(0.0, per_call - steps / self.ranks * self.step_bytes / base.bandwidth) / steps
        which = "median" if median else "best"
        return Link(f"{base.name}, alpha from a train of {self.step_allreduces} all-reduces ({which})",
                    base.bandwidth, alpha, base.note)

    def predicted_step_seconds(self, link: Link | None = None) -> float:
        return self.step_allreduces * allreduce_time(self.step_bytes, self.ranks, link or self.link or self.fit())

    def to_dict(self) -> dict[str, Any]:
        link = self.link or self.fit()
        return asdict(self) | {"link": link.to_dict(), "alpha_s": link.latency, "beta_Bps": link.bandwidth,
                               "predicted_step_seconds": self.predicted_step_seconds(link)}


def fit_link(sizes: Sequence[float], seconds: Sequence[float], ranks: int,
             name: str = "this machine's loopback (gloo, measured)") -> Link:
    """The ``Link`` whose ring all-reduce time best fits (least squares) the measured ``seconds``."""
    if len(sizes) != len(seconds) or len(sizes) < 2 or ranks < 2:
        raise ValueError("fitting alpha and beta needs two or more (size, seconds) pairs and two or more ranks")
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    if sxx == 0:
        raise ValueError("fitting alpha and beta needs messages of different sizes")
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx
    intercept = my - slope * mx
    if slope <= 0:
        raise ValueError(f"the measured times do not grow with the message (slope {slope:.3g} s/B): too noisy to fit")
    steps = 2 * (ranks - 1)
    return Link(name, steps / ranks / slope, max(0.0, intercept) / steps,
                f"fitted from {n} message sizes, {min(sizes):.0f} to {max(sizes):.0f} B, over {ranks} processes")


def measure_allreduce(sizes: Sequence[int] = DEFAULT_SIZES, ranks: int = 2, repeats: int = 50,
                      step_allreduces: int = 60, step_bytes: int = 2304,
                      step_repeats: int = 10) -> AllReduceMeasurement:
    """Spawn ``ranks`` processes (gloo, 127.0.0.1, one thread each) and time all-reduces of fp32 tensors
    of ``sizes`` bytes and ``step_repeats`` decode steps of ``step_allreduces`` x ``step_bytes``
    (default: SmolLM2-135M, 30 layers x 2 of [1, 576] fp32)."""
    import torch.multiprocessing as mp

    if ranks < 2:
        raise ValueError("measuring an all-reduce needs two or more processes")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_rank, args=(ranks, _free_port(), list(sizes), repeats, step_allreduces, step_bytes, step_repeats,
                              out), nprocs=ranks, join=True)
        times, step = torch.load(out)
    return AllReduceMeasurement(ranks, list(sizes), [t[0] for t in times], [t[1] for t in times], step_allreduces,
                                step_bytes, step[0], step[1], repeats)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(fn: Any, repeats: int) -> tuple[float, float]:
    import torch.distributed as dist

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def _rank(rank: int, ranks: int, port: int, sizes: list[int], repeats: int, step_allreduces: int, step_bytes: int,
          step_repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    times = []
    for size in sizes:
        x = torch.ones(max(1, size // 4))
        times.append(_timed(lambda: dist.all_reduce(x), repeats))
    acts = [torch.ones(max(1, step_bytes // 4)) for _ in range(step_allreduces)]

    def step() -> None:
        for a in acts:
            dist.all_reduce(a)

    step_s = _timed(step, step_repeats)
    if rank == 0:
        torch.save((times, step_s), out)
    dist.barrier()
    dist.destroy_process_group()
