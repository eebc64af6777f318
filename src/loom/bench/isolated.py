"""A benchmark peer in its own process, so that its crash is a reported error instead of the benchmark's end.

llama.cpp has died with SIGILL inside its decode on some machines; in loom's process that killed the
whole benchmark. ``IsolatedPeer`` builds the peer in a child process (multiprocessing's spawn start
method: a fresh interpreter, nothing inherited from loom's threads or native libraries) and sends it
each run over a pipe. If the child raises, exits or is killed by a signal, the call raises
``PeerFailed`` with what happened and the child is gone; the benchmark records that as the peer's
error and goes on.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

from loom.analysis.runs import LatencySample


class PeerFailed(RuntimeError):
    """The isolated peer raised, exited or was killed; the message says which."""


def _describe_exception(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
    return f"{type(e).__name__}: {e}{at}"


def _serve(conn: Connection, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """The child: build the peer, answer ("ready"), then run each (prompt_ids, gen_len) until None arrives."""
    try:
        peer = factory(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        conn.send(("error", f"building the peer failed: {_describe_exception(e)}"))
        return
    conn.send(("ok", None))
    while True:
        request = conn.recv()
        if request is None:
            return
        try:
            conn.send(("ok", peer.run(*request)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", _describe_exception(e)))
            return


def exit_description(exitcode: int | None) -> str:
    """What a child's exit code says: killed by a signal (negative codes), exited with a status, or still running."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


class IsolatedPeer:
    """``factory(*args, **kwargs)`` built and run in a child process; ``run`` as the peer's own.

    ``factory`` must be importable by name (a module-level class or function), as spawn pickles it.
    Raises ``PeerFailed`` when building fails; ``close`` ends the child (also done on failure).
    """

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, factory, args, kwargs), daemon=True,
                                    name=f"loom-peer-{getattr(factory, '__name__', 'peer')}")
        self._process.start()
        child.close()  # the child holds the only other end: its death reads as EOF here
        self._call(None, send=False)

    def _call(self, request: Any, send: bool = True) -> Any:
        try:
            if send:
                self._conn.send(request)
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(30)
            self.close()
            raise PeerFailed(f"the peer's process {exit_description(self._process.exitcode)}") from None
        if status != "ok":
            self.close()
            raise PeerFailed(value)
        return value

    def run(self, prompt_ids: Sequence[int], gen_len: int) -> LatencySample:
        return self._call((list(prompt_ids), gen_len))

    def call(self, *args: Any) -> Any:
        """The peer's ``run(*args)`` in the child, for peers whose run takes other arguments."""
        return self._call(args)

    @classmethod
    def call_once(cls, factory: Callable[..., Any], args: tuple, call_args: tuple) -> dict[str, Any]:
        """Build the peer in a child, run ``call(*call_args)`` once and end the child: its result, or
        ``{"error": why}`` when the peer failed (a benchmark row records it and goes on)."""
        try:
            peer = cls(factory, *args)
            try:
                return peer.call(*call_args)
            finally:
                peer.close()
        except PeerFailed as e:
            return {"error": str(e)}

    def close(self) -> None:
        """Ask the child to stop and wait for it (killing it if it does not)."""
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()
