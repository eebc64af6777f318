"""Where a model runs: ``"cpu"`` (the default) or ``"cuda"`` (an NVIDIA GPU through PyTorch).

Every tensor a forward touches lives on the model's device; the engine's bookkeeping (block tables,
slot lists, sampling state) stays in Python and is copied over once per step. loom's native C++ ops
are CPU kernels: on CUDA their PyTorch twins run instead, and quantized linears use torch's CUDA
kernels (see layers/quantized.py).
"""

from __future__ import annotations

import os

import torch

DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cpu; "cuda" / "cuda:N" must be usable (torch built with CUDA and a GPU present)."""
    d = torch.device("cpu" if device is None else device)
    if d.type not in DEVICES:
        raise ValueError(f"unknown device {str(device)!r}; choose one of {DEVICES}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    return d


def default_dtype(device: torch.device) -> torch.dtype:
    """The dense dtype a device runs by default: fp32 on the CPU, bf16 on CUDA (its tensor cores' type,
    half the bytes per decoded token)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (cpu for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU); call before reading a host clock."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _read_int(path: str) -> int | None:
    """The integer in a one-line file (cgroup's "max" and a missing file: None)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's estimate of memory available to new work without swapping (``MemAvailable``: free
    pages plus the page cache and slabs it can reclaim), in bytes; None where the file lacks it."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup may still grow by (limit minus usage; v2, else v1); None
    when no limit is set."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(os.path.join(root, limit_file)), _read_int(os.path.join(root, usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2^63
            return max(limit - usage, 0)
    return None


def available_memory(device: torch.device | str | None = None, meminfo: str = "/proc/meminfo",
                     cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Bytes of memory a new allocation can use now. On the CPU: ``MemAvailable`` (not the free pages
    alone, which a warm page cache shrinks from one start to the next), capped by the cgroup's limit;
    on CUDA: the GPU's free memory."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    host = mem_available(meminfo)
    if host is None:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cap = cgroup_headroom(cgroup_root)
    return host if cap is None else min(host, cap)
