"""The physical KV cache: per layer, K and V tensors of [num_blocks, block_size, kv_heads, head_dim].

Latent attention (layers/mla.py) caches one entry per token and layer, [c_kv | rotated k_rope]: K is
[num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim] and V is empty (its last dimension 0)."""

from __future__ import annotations

import numpy as np
import torch

from loom.config import CacheConfig, ModelConfig
from loom.device import available_memory
from loom.layers.kv_quant import Int8LayerKV, key_scales_from_cache


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    # On the CPU numpy's zeros come from calloc: the OS hands out zero pages lazily, so a multi-GiB
    # cache costs nothing until used (torch.zeros writes every byte up front: ~0.5 s per GiB here).
    # On a GPU torch.zeros is one memset at device bandwidth. Zeros, not garbage, matter: padded
    # attention reads unused slots, and masked NaN would still poison it.
    if device is not None and torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    element = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(shape, dtype={2: np.int16, 4: np.float32, 1: np.int8}[element])
    return torch.from_numpy(raw).view(dtype)


class KVCache:
    """Storage only; which sequence owns which block is the block manager's business.

    A contiguous cache for one sequence is ``KVCache(config, num_blocks=1, block_size=capacity)``.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, kv_dtype: str = "auto",
                 device: torch.device | str | None = None) -> None:
        heads, k_dim, v_dim = config.kv_cache_shape()
        shape = (config.num_layers, num_blocks, block_size, heads, k_dim)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.device = torch.device(device if device is not None else "cpu")
        self.quantized = kv_dtype == "int8"
        if self.quantized and config.is_mla:
            raise ValueError("the int8 KV cache quantizes keys and values; latent attention caches latents "
                             "(use kv_dtype 'auto')")
        store = torch.int8 if self.quantized else dtype
        self.k = _zeros(shape, store, self.device)
        self.v = _zeros(shape[:-1] + (v_dim,), store, self.device)
        if self.quantized:  # see layers/kv_quant.py; key scales are set by calibrate_key_scales
            self.k_scale = torch.ones(config.num_layers, config.num_kv_heads, config.head_dim, device=self.device)
            self.v_scale = _zeros(shape[:-1], torch.float32, self.device)
            self.v_zero = _zeros(shape[:-1], torch.float32, self.device)

    @classmethod
    def from_config(cls, model_config: ModelConfig, cache_config: CacheConfig,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    context: int | None = None) -> KVCache:
        """As many blocks as the budget allows: ``num_blocks``, else ``memory_bytes``, else a fraction
        of the memory available now on ``device`` (host memory, or the GPU's free memory). The default
        budget never holds fewer than ``context`` tokens (the model's context) while that fits in half
        of the available memory, so the context a user gets does not depend on the page cache."""
        n = cls.blocks_for(model_config, cache_config, dtype, device, context)
        return cls(model_config, n, cache_config.block_size, dtype, cache_config.kv_dtype, device)

    @classmethod
    def blocks_for(cls, model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, context: int | None = None) -> int:
        """The number of blocks ``from_config`` allocates (see there)."""
        per_block = cls.bytes_per_block(model_config, cache_config.block_size, dtype, cache_config.kv_dtype)
        if cache_config.num_blocks is not None:
            n = cache_config.num_blocks
        elif cache_config.memory_bytes is not None:
            n = cache_config.memory_bytes // per_block
        else:
            available = available_memory(device)
            n = int(cache_config.memory_fraction * available) // per_block
            if context is not None:
                whole = -(-context // cache_config.block_size)
                if n < whole <= (available // 2) // per_block:
                    n = whole
        if n < 1:
            raise ValueError(f"the KV cache budget holds no block (one block is {per_block} bytes)")
        return n

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.quantized:
            return [Int8LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i], self.v_zero[i])
                    for i in range(self.k.shape[0])]
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write)."""
        if copies:
            src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=self.device)
            dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=self.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
            if self.quantized:
                self.v_scale[:, dst] = self.v_scale[:, src]
                self.v_zero[:, dst] = self.v_zero[:, src]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        extra = self.v_scale.nbytes + self.v_zero.nbytes + self.k_scale.nbytes if self.quantized else 0
        return self.k.nbytes + self.v.nbytes + extra

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32,
                        kv_dtype: str = "auto") -> int:
        if kv_dtype == "int8":  # int8 codes + a fp32 scale and zero per (token, head) for the values
            return int((config.kv_bytes_per_token(1) + config.num_layers * config.num_kv_heads * 8) * block_size)
        return int(config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size)

    @torch.inference_mode()
    def calibrate_key_scales(self, model: torch.nn.Module, token_ids: list[int]) -> None:
        """Fix the int8 keys' per-channel scales from the keys ``model`` computes on ``token_ids`` (at most
        the model's context of them: a learned position table has no rows past it)."""
        from loom.layers.attention import AttentionMetadata

        token_ids = token_ids[: model.config.max_position_embeddings]  # type: ignore[attr-defined]
        n, dev = len(token_ids), self.device
        # a cache in the model's own dtype (attention reads it with the model's queries)
        fp = KVCache(model.config, 1, n, model.dtype, device=dev)  # type: ignore[attr-defined]
        meta = AttentionMetadata(torch.arange(n, device=dev), [0, n], [n], torch.arange(n, device=dev),
                                 torch.zeros(1, 1, dtype=torch.long, device=dev))
        model(torch.tensor(token_ids, device=dev), meta, fp.layers())
        self.k_scale.copy_(key_scales_from_cache(fp.k.float(), n))
