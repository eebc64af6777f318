"""The physical KV cache: per layer, K and V tensors of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch

from loom.config import ModelConfig


class KVCache:
    """Storage only; which sequence owns which block is the block manager's business.

    A contiguous cache for one sequence is ``KVCache(config, num_blocks=1, block_size=capacity)``.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        return int(config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size)
