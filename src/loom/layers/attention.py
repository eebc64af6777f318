"""Multi-head attention with grouped key/value heads (MHA / GQA / MQA), over a flat batch.

A batch is a flat run of T tokens from B sequences (sequence i owns tokens
``query_start[i]:query_start[i + 1]``). ``AttentionMetadata`` says where each token sits and
where its keys and values live; the layer never knows whether the cache is contiguous or paged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.layers.kernels import SlotWrites, gather_kv, get_kernel, paged_decode_attention, sdpa_attention, write_kv
from loom.layers.kv_quant import Int8LayerKV
from loom.layers.linear import Linear
from loom.layers.norm import RMSNorm, make_head_norm
from loom.layers.position import RopeTables, RotaryEmbedding, alibi_bias, alibi_slopes


class BoundedKV(Protocol):
    """A sequence whose KV memory is bounded by an eviction policy (the engine's kv_policy.EvictingKV is one).

    Its tokens carry their rank in its cache as position and slot -1; attention hands it the layer's
    new tokens and it attends over the tokens it kept (and evicts), keeping K/V where it chooses.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding, scale: float,
               kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
        """q [m, Hq, D] rotated by rank; k [m, Hkv, D] not rotated; v [m, Hkv, D] -> [m, Hq, D]."""
        ...


@dataclass
class AttentionMetadata:
    """Where the tokens of a flat batch are, and where their keys and values go and come from.

    positions:     [T] absolute position of every token (RoPE / ALiBi read it).
    query_start:   B + 1 offsets: sequence i's tokens are query_start[i]:query_start[i + 1].
    context_lens:  B: keys sequence i attends over after this step (cached + new).
    slot_mapping:  [T] cache slot (block * block_size + offset) each token's K/V is written to;
                   None means no cache (plain causal attention among the batch's own tokens).
    block_tables:  [B, max_blocks] physical block of each logical block of each sequence, padded
                   with any valid block id (0) past a sequence's last block.
    evicting:      sequence index -> its ``BoundedKV`` (a sequence under a KV eviction policy): its
                   tokens' positions are their ranks in its cache, their slots -1, and attention over
                   its kept tokens is the state's ``attend``.
    """

    positions: torch.Tensor
    query_start: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    evicting: dict[int, BoundedKV] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def cached(self) -> bool:
        return self.slot_mapping is not None

    # Derived once per forward, shared by all layers.
    @cached_property
    def writes(self) -> SlotWrites:
        return SlotWrites.plan(self.slot_mapping)

    @cached_property
    def tables(self) -> list[list[int]]:
        return self.block_tables.tolist()

    @cached_property
    def decode_batch(self) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Sequences with one new token (decodes), attended in one batched call when there are two or
        more: (their indices, their token rows, their block tables, their context lengths)."""
        if not self.cached or self.num_seqs == 1:
            return None
        evicting = self.evicting or {}
        idx = [i for i in range(self.num_seqs)
               if self.query_start[i + 1] - self.query_start[i] == 1 and i not in evicting]
        if len(idx) < 2:
            return None
        dev = self.block_tables.device
        rows = torch.tensor([self.query_start[i] for i in idx], dtype=torch.long, device=dev)
        if len(idx) == self.num_seqs:
            tables = self.block_tables
        else:
            tables = self.block_tables.index_select(0, torch.tensor(idx, dtype=torch.long, device=dev))
        lens = torch.tensor([self.context_lens[i] for i in idx], dtype=torch.long, device=dev)
        return idx, rows, tables, lens

    @cached_property
    def equal_uncached_length(self) -> int | None:
        """T when the batch is B uncached sequences of T tokens each, all queries (a training batch, a
        perplexity window batch): then attention runs as one [B, H, T, D] call instead of B calls."""
        if self.cached or self.evicting or self.num_seqs < 2:
            return None
        n = self.context_lens[0]
        if any(c != n for c in self.context_lens) or self.query_start[-1] != n * self.num_seqs:
            return None
        return n

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """The same metadata with its tensors on ``device`` (the Python lists stay as they are)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AttentionMetadata(self.positions.to(device), self.query_start, self.context_lens,
                                 move(self.slot_mapping), move(self.block_tables), self.evicting)

    @classmethod
    def uncached(cls, lengths: Sequence[int]) -> AttentionMetadata:
        """Each sequence attends causally over its own tokens only, positions from 0."""
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        positions = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        return cls(positions=positions, query_start=starts, context_lens=list(lengths))


class FullQKNorm(nn.Module):
    """QK-norm over whole projections (OLMoE, ``ModelConfig.qk_norm_full``): q <- RMSNorm(q) over all q_size
    outputs of the q projection and k <- RMSNorm(k) over all kv_size outputs of k, before RoPE; v unchanged.
    (Per-head QK-norm, as in Qwen3 and Gemma 3, normalizes each head_dim slice instead.)"""

    def __init__(self, q_size: int, kv_size: int, eps: float) -> None:
        super().__init__()
        self.q_size, self.kv_size = q_size, kv_size
        self.q = RMSNorm(q_size, eps)
        self.k = RMSNorm(kv_size, eps)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, q_size + 2 kv_size] -> the same with its q and k parts normalized."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return torch.cat([self.q(q), self.k(k), v], dim=-1)


class Attention(nn.Module):
    """q, k, v = x W_qkv^T; RoPE on q, k; o = softmax(q k^T / sqrt(d) + bias) v; out = o W_o^T.

    With ``qk_norm`` each query and key head is RMS-normalized over its head_dim values before RoPE
    (q_norm, k_norm: Gemma 3, Qwen3; Dehghani et al. 2302.05442's QK-layernorm); ``attn_scale`` replaces
    1 / sqrt(d)."""

    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding | None,
                 kernel: str = "sdpa", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.attn_scale if config.attn_scale is not None else 1.0 / math.sqrt(config.head_dim)
        self.layer = layer
        self.window = config.layer_window(layer)
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size,
                               bias=config.qkv_bias, dtype=dtype)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=config.attn_out_bias, dtype=dtype)
        self.qk_norm_full = FullQKNorm(config.q_size, config.kv_size, config.norm_eps).to(dtype) \
            if config.qk_norm_full else None
        self.rotary = rotary
        self.q_norm = make_head_norm(config).to(dtype) if config.qk_norm else None
        self.k_norm = make_head_norm(config).to(dtype) if config.qk_norm else None
        if config.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(config.num_heads), persistent=False)
        else:
            self.alibi = None
        self.kernel_name = kernel
        self.kernel = get_kernel(kernel)

    def set_kernel(self, name: str) -> None:
        self.kernel_name, self.kernel = name, get_kernel(name)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: RopeTables | None = None) -> torch.Tensor:
        t, hq, hkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        if self.qk_norm_full is not None:
            qkv = self.qk_norm_full(qkv)
        qkv = qkv.view(t, hq + 2 * hkv, self.head_dim)
        if self.q_norm is not None:
            qkv = torch.cat((self.q_norm(qkv[:, :hq]), self.k_norm(qkv[:, hq:hq + hkv]), qkv[:, hq + hkv:]), dim=1)
        if self.rotary is not None:
            rope = rope if rope is not None else self.rotary.prepare(meta.positions, x.dtype)
            qk = self.rotary.apply(qkv[:, : hq + hkv], rope)  # q and k heads rotated together
            q, k = qk[:, :hq], qk[:, hq:]
        else:
            q, k = qkv[:, :hq], qkv[:, hq:hq + hkv]
        v = qkv[:, hq + hkv:]
        cache = kv_cache if meta.cached else None
        if isinstance(cache, Int8LayerKV):
            cache.write(*meta.writes.kept(k, v), meta.writes.flat_slots)
        elif cache is not None:
            write_kv(cache[0], cache[1], k, v, meta.writes)
        if meta.evicting:  # keys of bounded sequences stay unrotated: the cache rotates them by rank
            k = qkv[:, hq:hq + hkv]
        if meta.num_seqs == 1:
            return self.o_proj(self._attend_one(0, q, k, v, meta, cache).reshape(t, self.q_size))
        n = meta.equal_uncached_length
        if n is not None and self.alibi is None and self.window is None and self.kernel is sdpa_attention:
            b = meta.num_seqs
            q4, k4, v4 = (z.reshape(b, n, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=self.scale, enable_gqa=hq != hkv)
            return self.o_proj(o.transpose(1, 2).reshape(t, self.q_size))
        out = torch.empty(t, hq, self.head_dim, dtype=x.dtype, device=x.device)
        batched: list[int] = []
        decodes = meta.decode_batch if (cache is not None and self.alibi is None) else None
        if decodes is not None:  # all one-token sequences in one call
            batched, rows, tables, lens = decodes
            q_rows = q if len(batched) == t else q.index_select(0, rows)
            if isinstance(cache, Int8LayerKV):
                o = cache.decode_attention(q_rows, tables, lens, self.scale, self.window or 0)
            else:
                o = paged_decode_attention(q_rows, cache[0], cache[1], tables, lens, self.scale, self.window or 0)
            out.index_copy_(0, rows, o)
        for i in sorted(set(range(meta.num_seqs)) - set(batched)):
            out[meta.query_start[i]:meta.query_start[i + 1]] = self._attend_one(i, q, k, v, meta, cache)
        return self.o_proj(out.reshape(t, self.q_size))

    def _attend_one(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                    cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Attention output [Tq, Hq, D] of sequence i of the batch."""
        s, e = meta.query_start[i], meta.query_start[i + 1]
        if meta.evicting and i in meta.evicting:
            return meta.evicting[i].attend(self.layer, q[s:e], k[s:e], v[s:e], cache, self.rotary, self.scale,
                                           self.kernel)
        length = meta.context_lens[i]
        if cache is not None:
            table, row = meta.tables[i], meta.block_tables[i]  # the list for views, the tensor for gathers
            if isinstance(cache, Int8LayerKV):
                ki, vi = cache.gather(table, length, row, q.dtype)
            else:
                ki, vi = gather_kv(cache[0], table, length, row), gather_kv(cache[1], table, length, row)
        else:
            ki, vi = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        bias = None
        if self.alibi is not None:
            bias = alibi_bias(self.alibi, meta.positions[s:e], torch.arange(length, device=q.device))
        return self.kernel(q[s:e].transpose(0, 1), ki, vi, scale=self.scale, window=self.window,
                           bias=bias).transpose(0, 1)

