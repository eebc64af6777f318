"""int8 KV cache (KIVI's split, arXiv 2402.02750): keys per channel, values per token.

Keys have a few channels with large magnitudes that persist across tokens (and RoPE's slow
frequencies barely rotate them), so each (layer, KV head, channel) gets its own scale; loom fixes
those scales once, from calibration text, as the maximum |k| seen there (with a 10% margin, values
beyond it are clipped): k ~ round(k / s_c) s_c, codes in [-127, 127]. Values have no such structure
across channels but vary from token to token, so each (token, KV head) gets an asymmetric grid
computed when the token is written: v ~ q s_t + z_t, codes in [-128, 127].

``Int8LayerKV`` is one layer's cache; it writes (quantizing), gathers (dequantizing) and runs
decode attention over the paged blocks. Attention over int8 keys needs no dequantized copy of K:
q . (k_q * s) = (q * s) . k_q, and for values sum_t p_t (q_t s_t + z_t) = sum_t (p_t s_t) q_t + sum_t p_t z_t:
the native kernel (native/kernels.h: attend_heads_int8) computes it that way, reading 2 D + 8 bytes per (token,
KV head) against a bf16 cache's 4 D. The PyTorch twins below (``write_int8_torch``, ``decode_attention_int8_torch``)
dequantize the gathered blocks, which is the definition; on a CPU with the native build the cache uses the native
ops, whose writes round exactly as the twins do.
"""

from __future__ import annotations

import torch

from loom.layers.kernels import paged_decode_attention_torch

KEY_MARGIN = 1.1


class Int8LayerKV(tuple):
    """(k, v) int8 [num_blocks, block_size, Hkv, D] with their scales; indexes like the fp (k, v) pair."""

    def __new__(cls, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                v_zero: torch.Tensor) -> Int8LayerKV:
        obj = super().__new__(cls, (k, v))
        obj.k_scale = k_scale  # [Hkv, D]
        obj.v_scale = v_scale  # [num_blocks, block_size, Hkv]
        obj.v_zero = v_zero
        return obj

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize and store tokens [T, Hkv, D] at flat slots [T]."""
        if _native(self[0], k):
            torch.ops.loom.int8_kv_write(k, v, slots, self[0], self[1], self.k_scale, self.v_scale, self.v_zero)
            return
        write_int8_torch(k, v, slots, self[0], self[1], self.k_scale, self.v_scale, self.v_zero)

    def gather(self, blocks: list[int], length: int, index: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens of a sequence, dequantized to ``dtype`` (the queries'), head-major
        [Hkv, length, D]; ``index``: the block table as a tensor on the cache's device, if at hand."""
        n = -(-length // self[0].shape[1])
        if index is not None and index.device == self[0].device:
            idx = index[:n]
        else:
            idx = torch.tensor(blocks[:n], dtype=torch.long, device=self[0].device)
        k, v = self.dequantize(idx)
        hkv, d = k.shape[-2], k.shape[-1]
        return (k.reshape(-1, hkv, d)[:length].transpose(0, 1).to(dtype),
                v.reshape(-1, hkv, d)[:length].transpose(0, 1).to(dtype))

    def dequantize(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 K and V of whole blocks [n, block_size, Hkv, D]."""
        k = self[0].index_select(0, blocks).float() * self.k_scale
        v = (self[1].index_select(0, blocks).float() * self.v_scale.index_select(0, blocks).unsqueeze(-1)
             + self.v_zero.index_select(0, blocks).unsqueeze(-1))
        return k, v

    def decode_attention(self, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, window: int) -> torch.Tensor:
        """One query per sequence over its blocks: the native kernel, or its twin (dequantized blocks)."""
        if _native(self[0], q):
            return torch.ops.loom.paged_decode_attention_int8(q, self[0], self[1], self.k_scale, self.v_scale,
                                                              self.v_zero, block_tables, context_lens, scale, window)
        return decode_attention_int8_torch(q, self[0], self[1], self.k_scale, self.v_scale, self.v_zero, block_tables,
                                           context_lens, scale, window)


def _native(cache: torch.Tensor, x: torch.Tensor) -> bool:
    from loom.layers.fused import use_native

    return cache.device.type == "cpu" and use_native(x)


def write_int8_torch(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor) -> None:
    """Quantize tokens [T, Hkv, D] into one layer's int8 cache at flat slots [T] (the native op's twin)."""
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, quantize_keys(k, k_scale))
    codes, scale, zero = quantize_values(v)
    v_cache.view(-1, hkv, d).index_copy_(0, slots, codes)
    v_scale.view(-1, hkv).index_copy_(0, slots, scale)
    v_zero.view(-1, hkv).index_copy_(0, slots, zero)


def decode_attention_int8_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                                v_scale: torch.Tensor, v_zero: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """One query per sequence [B, Hq, D] over its int8 blocks, dequantized to the query's dtype first (the
    definition; the native op's twin)."""
    blocks = block_tables.reshape(-1)  # the sequences' blocks, in table order
    k = k_cache.index_select(0, blocks).float() * k_scale
    v = v_cache.index_select(0, blocks).float() * v_scale.index_select(0, blocks).unsqueeze(-1) + \
        v_zero.index_select(0, blocks).unsqueeze(-1)
    local = torch.arange(block_tables.numel(), device=block_tables.device).view(block_tables.shape)
    return paged_decode_attention_torch(q, k.to(q.dtype), v.to(q.dtype), local, context_lens, scale, window)


def quantize_keys(k: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of keys [T, Hkv, D] on the fixed per-channel grid ``k_scale`` [Hkv, D] (clipped)."""
    return torch.round(k.float() / k_scale).clamp(-127, 127).to(torch.int8)


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (token, head) asymmetric int8: codes [T, Hkv, D], scale and zero [T, Hkv]."""
    v = v.float()
    lo, hi = v.amin(dim=-1), v.amax(dim=-1)
    scale = ((hi - lo) / 255.0).clamp_min(1e-8)
    zero = lo + 128.0 * scale  # code -128 maps to lo
    codes = torch.round((v - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return codes, scale, zero


def key_scales_from_cache(k: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per (layer, head, channel) key scale from an fp cache [L, 1, capacity, Hkv, D] holding ``tokens``
    calibration tokens: margin * max |k| / 127."""
    absmax = k[:, 0, :tokens].abs().amax(dim=1)  # [L, Hkv, D]
    return (absmax * KEY_MARGIN / 127.0).clamp_min(1e-6)
