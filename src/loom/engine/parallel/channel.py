"""Rank 0's commands to the workers: each step's metadata broadcast, then the same computation on every rank.

A command is a name and a payload (host tensors and lists: the flat batch, the attention metadata, block
copies) broadcast from rank 0 (``broadcast_object_list``); every rank then runs the same code, meeting in
the same collectives inside the model (the row-parallel all-reduces, the logits' all-gather). One lock
orders commands: the engine thread's steps, the embedding thread's forwards and the heartbeat never
interleave their collectives.

The heartbeat: while rank 0 sends nothing for ``heartbeat_s`` it sends "ping" (a broadcast and a one-element
all-reduce). Workers thus never wait longer than the collective timeout for their next command, and a worker
that died or hangs is found between requests too. Any failure inside a command leaves the ranks out of step
for good: the channel is broken from then on (``WorkerLostError``), which the server reports as unhealthy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from loom.engine.parallel.world import World
from loom.errors import WorkerLostError

log = logging.getLogger("loom.parallel")


class Channel:
    """Rank 0's side: ``with channel.command(name, payload): <rank 0's part of the computation>``."""

    def __init__(self, world: World, heartbeat_s: float) -> None:
        self.world = world
        self.heartbeat_s = heartbeat_s
        self.lock = threading.RLock()
        self.failure: str | None = None
        self.closed = False
        self._last = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="loom-tp-heartbeat", daemon=True)
        self._beat.start()

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(message)`` (from whichever thread found it) when the channel breaks."""
        self._listeners.append(listener)

    def check(self) -> None:
        if self.failure is not None:
            raise WorkerLostError(self.failure)
        if self.closed:
            raise WorkerLostError("the tensor-parallel workers were shut down")

    @contextlib.contextmanager
    def command(self, name: str, payload: Any = None) -> Iterator[None]:
        with self.lock:
            self.check()
            try:
                dist.broadcast_object_list([(name, payload)], src=0)
                yield
            except WorkerLostError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure mid-command leaves the ranks out of step
                raise WorkerLostError(self._fail(name, e)) from e
            finally:
                self._last = time.monotonic()

    def gather(self, name: str, mine: Any) -> list[Any]:
        """Run command ``name`` and collect every rank's answer (rank 0's is ``mine``), in rank order."""
        with self.command(name):
            out: list[Any] = [None] * self.world.size
            dist.gather_object(mine, out, dst=0)
            return out

    def _fail(self, name: str, error: BaseException) -> str:
        if self.failure is None:
            self.failure = (f"tensor parallelism failed during {name!r}: a worker died, hung past the "
                            f"{self.world.timeout_s:g} s collective timeout or failed ({type(error).__name__}: "
                            f"{error}); the engine cannot continue")
            log.error("%s", self.failure)
            for listener in self._listeners:
                listener(self.failure)
        return self.failure

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            if self.failure is not None or self.closed:
                return
            if time.monotonic() - self._last < self.heartbeat_s or not self.lock.acquire(blocking=False):
                continue
            try:
                if self.failure is None and not self.closed:
                    with self.command("ping"):
                        dist.all_reduce(torch.zeros(1))
            except WorkerLostError:
                return
            finally:
                self.lock.release()

    def close(self) -> None:
        """Stop the workers ("stop") and the heartbeat; no-op once broken or closed."""
        self._stop.set()
        with self.lock:
            if self.failure is None and not self.closed:
                try:
                    dist.broadcast_object_list([("stop", None)], src=0)
                except Exception as e:  # noqa: BLE001 - shutting down: report, do not raise
                    log.warning("could not stop the tensor-parallel workers cleanly: %s", e)
            self.closed = True


def receive() -> tuple[str, Any]:
    """A worker's wait for rank 0's next command."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
