"""Native CPU kernels, compiled on first use (torch's C++ extension JIT, ~15 s once, cached).

Only what PyTorch cannot do fast from Python lives here: paged decode attention reads each
sequence's keys and values in place through its block table, where the pure-PyTorch path must first
gather them into a padded copy (three passes over the KV cache instead of one); fused elementwise
ops (RMSNorm, SiLU-and-multiply, RoPE) that make one pass where PyTorch makes several; loom's int4 /
int8 GEMV; and the decode step of small batches as one call (decode_step.cpp), built from the same
pieces (kernels.h).

Every native op has a PyTorch twin that computes the same thing; the twin is used when the native
build is unavailable (no compiler) or disabled with ``LOOM_NATIVE=0``, and tests hold the two equal.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings

import torch

from loom.cache import cache_dir

log = logging.getLogger(__name__)
SOURCES = ["paged_attention.cpp", "fused.cpp", "quant_gemm.cpp", "decode_step.cpp"]
HEADERS = ["kernels.h"]  # included by the sources: part of the build's identity
# -ffast-math lets reductions vectorize; -fno-finite-math-only keeps inf/NaN semantics (overflowing
# activations must behave as in PyTorch, not as undefined behaviour).
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]


def _build_dir(tag: str) -> str:
    path = os.path.join(cache_dir(), "native", tag)
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Compile (once) and load the native ops; False if disabled or the build fails."""
    if os.environ.get("LOOM_NATIVE", "1") == "0":
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join(here, s) for s in SOURCES]
    digest = hashlib.sha256()
    for path in sources + [os.path.join(here, h) for h in HEADERS]:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(FLAGS).encode() + torch.__version__.encode())
    # The build file names the sources by path: checkouts at different paths (git worktrees) sharing one
    # cache would otherwise rebuild each other's library on every switch.
    digest.update(here.encode())
    tag = digest.hexdigest()[:12]
    try:
        from torch.utils import cpp_extension

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(name=f"loom_native_{tag}", sources=sources, extra_cflags=FLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=_build_dir(tag),
                               is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: fall back to PyTorch
        log.warning("loom native kernels unavailable (%s); using the PyTorch paths", e)
        return False
    return all(hasattr(torch.ops.loom, op) for op in ("paged_decode_attention", "rms_norm", "silu_and_mul", "rope", "quant_linear"))
