"""Where loom keeps what it builds or converts once: ``$LOOM_CACHE``, else ``~/.cache/loom``.

A leaf module (standard library only) so that the core (the native kernels' build) and the lab
(benchmark peers, compressed checkpoints) can share it without importing each other.
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    """loom's cache root: the ``LOOM_CACHE`` environment variable if set, else ``~/.cache/loom``."""
    return os.path.expanduser(os.environ.get("LOOM_CACHE") or os.path.join("~", ".cache", "loom"))
