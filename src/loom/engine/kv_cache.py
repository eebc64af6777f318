"""The physical KV cache: per layer, K and V tensors of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import os

import numpy as np
import torch

from loom.config import CacheConfig, ModelConfig


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # numpy's zeros come from calloc: the OS hands out zero pages lazily, so a multi-GiB cache costs
    # nothing until used (torch.zeros writes every byte up front: ~0.5 s per GiB here). Zeros, not
    # garbage, matter: padded attention reads unused slots, and masked NaN would still poison it.
    element = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(shape, dtype={2: np.int16, 4: np.float32, 1: np.int8}[element])
    return torch.from_numpy(raw).view(dtype)


def available_memory() -> int:
    """Bytes of physical memory available now."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class KVCache:
    """Storage only; which sequence owns which block is the block manager's business.

    A contiguous cache for one sequence is ``KVCache(config, num_blocks=1, block_size=capacity)``.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.k = _zeros(shape, dtype)
        self.v = _zeros(shape, dtype)

    @classmethod
    def from_config(cls, model_config: ModelConfig, cache_config: CacheConfig,
                    dtype: torch.dtype = torch.float32) -> KVCache:
        """As many blocks as the budget allows: ``num_blocks``, else ``memory_bytes``, else a fraction
        of the memory available now."""
        per_block = cls.bytes_per_block(model_config, cache_config.block_size, dtype)
        if cache_config.num_blocks is not None:
            n = cache_config.num_blocks
        else:
            budget = cache_config.memory_bytes or int(cache_config.memory_fraction * available_memory())
            n = budget // per_block
        if n < 1:
            raise ValueError(f"the KV cache budget holds no block (one block is {per_block} bytes)")
        return cls(model_config, n, cache_config.block_size, dtype)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write)."""
        if copies:
            src = torch.tensor([s for s, _ in copies], dtype=torch.long)
            dst = torch.tensor([d for _, d in copies], dtype=torch.long)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        return int(config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size)
