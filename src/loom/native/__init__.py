"""Native CPU kernels, compiled on first use (torch's C++ extension JIT, once, cached).

Only what PyTorch cannot do fast from Python lives here: paged decode attention reads each
sequence's keys and values in place through its block table, where the pure-PyTorch path must first
gather them into a padded copy (three passes over the KV cache instead of one); fused elementwise
ops (RMSNorm, SiLU-and-multiply, RoPE) that make one pass where PyTorch makes several; loom's int4 /
int8 GEMV; multi-LoRA's per-row adapter products (lora.cpp); and the decode step of small batches
as one call (decode_step.cpp), built from the same pieces (kernels.h).

Every native op has a PyTorch twin that computes the same thing; the twin is used when the native
build is unavailable or disabled with ``LOOM_NATIVE=0``, and tests hold the two equal. A build that
fails for any reason (no compiler, no ninja, a source file missing from an install) logs one warning
and ``available()`` answers False: loom then runs the twins.

The build lives under ``loom.cache.cache_dir()/native/<tag>`` (``$LOOM_CACHE``, else ~/.cache/loom),
the tag hashing the sources, flags, torch version and this directory's path. The compilation, when a
process actually runs one, is announced on stderr ("compiling loom's native kernels, once: N s") and
its seconds are ``build_seconds()``; a warm cache loads in well under a second and says nothing.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from loom.cache import cache_dir

log = logging.getLogger(__name__)
SOURCES = ["paged_attention.cpp", "fused.cpp", "quant_gemm.cpp", "w8a8.cpp", "decode_step.cpp", "lora.cpp",
           "gguf_fill.cpp"]
HEADERS = ["kernels.h"]  # included by the sources: part of the build's identity
OPS = ("paged_decode_attention", "rms_norm", "silu_and_mul", "rope", "quant_linear", "argmax_rows",
       "quantize_rows_int8", "scale_rows", "lora_add_")
# -ffast-math lets reductions vectorize; -fno-finite-math-only keeps inf/NaN semantics (overflowing
# activations must behave as in PyTorch, not as undefined behaviour).
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]


@dataclass
class _BuildRecord:
    compile_seconds: float = 0.0  # seconds this process spent compiling (not merely loading) the kernels


_record = _BuildRecord()


def build_seconds() -> float:
    """Seconds this process spent compiling the native kernels: 0.0 until a build ran, and when the
    build found its cache warm (it then only loaded the library) or was disabled or failed."""
    return _record.compile_seconds


def _build_dir(tag: str) -> str:
    path = os.path.join(cache_dir(), "native", tag)
    os.makedirs(path, exist_ok=True)
    return path


def _library_mtimes(folder: str) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "*.so"))}


def _build() -> None:
    """Compile (if the cache is cold) and load the kernels, registering ``torch.ops.loom``; raises on failure."""
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join(here, s) for s in SOURCES]
    digest = hashlib.sha256()
    for path in sources + [os.path.join(here, h) for h in HEADERS]:
        with open(path, "rb") as f:  # a file missing from an install raises here, before any compiling
            digest.update(f.read())
    digest.update(" ".join(FLAGS).encode() + torch.__version__.encode())
    # The build file names the sources by path: checkouts at different paths (git worktrees) sharing one
    # cache would otherwise rebuild each other's library on every switch.
    digest.update(here.encode())
    tag = digest.hexdigest()[:12]
    from torch.utils import cpp_extension

    folder = _build_dir(tag)
    before = _library_mtimes(folder)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpp_extension.load(name=f"loom_native_{tag}", sources=sources, extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=folder,
                           is_python_module=False, verbose=False)
    if _library_mtimes(folder) != before:  # ninja (re)linked the library: this process compiled it
        _record.compile_seconds = time.perf_counter() - t0
        print(f"loom: compiling loom's native kernels, once: {_record.compile_seconds:.1f} s (cached in {folder})",
              file=sys.stderr, flush=True)
    missing = [op for op in OPS if not hasattr(torch.ops.loom, op)]
    if missing:
        raise RuntimeError(f"the built library lacks {', '.join(missing)}")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Compile (once) and load the native ops; False if disabled (``LOOM_NATIVE=0``) or the build fails."""
    if os.environ.get("LOOM_NATIVE", "1") == "0":
        return False
    try:
        _build()
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a missing source...: fall back to PyTorch
        log.warning("loom native kernels unavailable (%s: %s); using the PyTorch paths", type(e).__name__, e)
        return False
    return True
