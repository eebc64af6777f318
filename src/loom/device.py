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


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes of memory free now: physical memory on the CPU, the GPU's free memory on CUDA."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
