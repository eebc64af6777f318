"""Multi-head latent attention (MLA: DeepSeek-V2, arXiv 2405.04434, section 2.1; DeepSeek-V3's layout).

Per token x (hidden h), with H heads, latent rank r (kv_lora_rank), head widths d_n (qk_nope_head_dim), d_r
(qk_rope_head_dim) and d_v (v_head_dim):

    q       = W_q x, or W_qb RMSNorm(W_qa x) (q_lora_rank > 0)       [H, d_n + d_r] = [q_nope | q_rope]
    [c | k_r] = W_kva x                                               c: [r] (the latent), k_r: [d_r]
    c       = RMSNorm(c)                                              (eps 1e-6, whatever rms_norm_eps says)
    q_rope, k_r = RoPE(q_rope), RoPE(k_r)                             the rope dims only; k_r is one head
                                                                      shared by all H (decoupled RoPE)
    [k_nope | v] = W_kvb c                                            per head: [H, d_n + d_v]
    k       = [k_nope | k_r]   per head;   o_h = softmax(q_h . k_h^T * scale) v_h;   out = W_o [o_1 .. o_H]

The cache holds per token and layer only ``[c | RoPE(k_r)]``: r + d_r values (one "head", no V), where
multi-head attention would cache H (d_n + d_r) key and H d_v value values (``ModelConfig.kv_bytes_per_token``,
``mha_kv_bytes_per_token``).

Two ways to attend over the cached latents, equal up to rounding:

- naive (prefill): up-project every cached c through W_kvb into keys and values, then ordinary attention.
- absorbed (decode; the paper's "W_UK absorbed into W_Q, W_UV into W_O"): with W_kvb's rows per head split
  into W_UK [d_n, r] and W_UV [d_v, r],
      q_nope . k_nope_j = q_nope . (W_UK c_j) = (W_UK^T q_nope) . c_j = q_lat . c_j
  so each head's query moves into the latent space once (q_lat = W_UK^T q_nope, [r]) and
      score_hj  = (q_lat_h . c_j + q_rope_h . k_r_j) * scale
      o_lat_h   = sum_j softmax_j(score_h) c_j                        (attention in the latent space)
      o_h       = W_UV o_lat_h                                        then out = W_o [o_1 .. o_H]
  which reads r + d_r values per cached token for all H heads (multi-query attention over the latents)
  instead of materializing H (d_n + d_r + d_v) values of keys and values per cached token.

RoPE: ``rope_interleave`` (DeepSeek's checkpoints, and always in transformers' deepseek_v2) rotates adjacent
pairs (x_2i, x_2i+1) by frequency i. Gathering the pairs into halves first ([x_0, x_2, ... | x_1, x_3, ...]) and
rotating halves gives the same pairs rotated, laid out in halves (as transformers' deepseek_v3 does); queries and
keys share the layout, so their dot products are unchanged. The softmax scale is (d_n + d_r)^-1/2, times YaRN's
mscale(s, mscale_all_dim)^2 for DeepSeek's YaRN configs (``ModelConfig.attn_scale``, set by the loader).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers.attention import AttentionMetadata
from loom.layers.kernels import SlotWrites, decode_visibility, gather_kv, get_kernel
from loom.layers.linear import Linear
from loom.layers.norm import RMSNorm
from loom.layers.position import RopeTables, RotaryEmbedding
from loom.layers import fused

# DeepSeek's q_a_layernorm and kv_a_layernorm keep RMSNorm's default eps (its reference code and transformers
# build them without rms_norm_eps).
LATENT_NORM_EPS = 1e-6


def write_latents(cache: torch.Tensor, latents: torch.Tensor, writes: SlotWrites) -> None:
    """Store new latent entries [T, 1, r + d_r] into one layer's cache [num_blocks, block_size, 1, r + d_r]."""
    flat = cache.view(-1, 1, cache.shape[-1])
    if writes.slots is None:
        flat[writes.start:writes.end] = latents
        return
    if writes.keep is not None:
        latents = latents[writes.keep]
    flat.index_copy_(0, writes.slots, latents.to(cache.dtype))


class MLAttention(nn.Module):
    """Multi-head latent attention over a flat batch (the module docstring has the equations).

    Parameters: ``q_proj`` [H (d_n + d_r), h] or ``q_a_proj`` [q_lora_rank, h], ``q_a_norm``, ``q_b_proj``
    [H (d_n + d_r), q_lora_rank]; ``kv_a_proj`` [r + d_r, h] (transformers' kv_a_proj_with_mqa), ``kv_a_norm``
    [r], ``kv_b_proj`` [H (d_n + d_v), r] (per head: d_n rows of W_UK, then d_v rows of W_UV), ``o_proj``
    [h, H d_v]. The paged cache of a layer is a pair (latents [blocks, block_size, 1, r + d_r], an empty V).

    ``absorb``: one-token queries over the cache (decodes) attend in the latent space (True, the default);
    False up-projects the cached latents for them too (the naive path, kept to check the absorbed one).
    """

    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding | None, kernel: str = "sdpa",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        c = config
        self.layer = layer
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.rank = c.kv_lora_rank
        self.scale = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(c.head_dim)  # type: ignore[arg-type]
        self.window = None
        self.interleave = c.rope_interleave
        h, heads = c.hidden_size, c.num_heads
        self.q_proj = self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        if c.q_lora_rank:
            self.q_a_proj = Linear(h, c.q_lora_rank, bias=c.qkv_bias, dtype=dtype)
            self.q_a_norm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS).to(dtype)
            self.q_b_proj = Linear(c.q_lora_rank, heads * c.head_dim, dtype=dtype)  # type: ignore[operator]
        else:
            self.q_proj = Linear(h, heads * c.head_dim, dtype=dtype)  # type: ignore[operator]
        self.kv_a_proj = Linear(h, self.rank + self.rope, bias=c.qkv_bias, dtype=dtype)
        self.kv_a_norm = RMSNorm(self.rank, LATENT_NORM_EPS).to(dtype)
        self.kv_b_proj = Linear(self.rank, heads * (self.nope + self.v_dim), dtype=dtype)
        self.o_proj = Linear(heads * self.v_dim, h, bias=c.attn_out_bias, dtype=dtype)
        self.rotary = rotary
        self.absorb = True
        self.kernel_name, self.kernel = kernel, get_kernel(kernel)

    def set_kernel(self, name: str) -> None:
        self.kernel_name, self.kernel = name, get_kernel(name)

    # The projections ----------------------------------------------------------------------------------

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """q [T, H, d_n + d_r], not rotated."""
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))  # type: ignore[misc]
        return q.view(x.shape[0], self.num_heads, self.head_dim)

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c [T, r] normalized, k_r [T, 1, d_r] not rotated)."""
        c, k_rope = self.kv_a_proj(x).split([self.rank, self.rope], dim=-1)
        return self.kv_a_norm(c), k_rope.unsqueeze(1)

    def rotate(self, x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
        """RoPE on x [T, heads, d_r] (pairs gathered into halves first when ``interleave``)."""
        if self.interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return fused.rope_torch(x, *tables)

    def up_project(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [L, H, d_n + d_r] and values [L, H, d_v] of cache entries [L, r + d_r] (the naive path)."""
        n = latents.shape[0]
        c, k_rope = latents.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c).view(n, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(n, self.num_heads, self.rope)), dim=-1)
        return k, v

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, d_n, r], W_UV [H, d_v, r]): kv_b_proj's rows per head (dequantized, for a quantized linear)."""
        w = self.kv_b_proj.dequantized_weight().view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope:]

    # Attention ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: RopeTables | None = None) -> torch.Tensor:
        if meta.evicting:
            raise NotImplementedError("KV eviction policies do not run over latent attention's cache")
        t, heads = x.shape[0], self.num_heads
        q = self.queries(x)
        c, k_rope = self.latents(x)
        tables = rope if rope is not None else self.rotary.prepare(meta.positions, x.dtype)  # type: ignore[union-attr]
        q = torch.cat((q[..., : self.nope], self.rotate(q[..., self.nope:], tables)), dim=-1)
        entries = torch.cat((c.unsqueeze(1), self.rotate(k_rope, tables)), dim=-1)  # [T, 1, r + d_r]
        cache = kv_cache[0] if (meta.cached and kv_cache is not None) else None
        if cache is not None:
            if not isinstance(kv_cache, tuple):
                raise NotImplementedError("latent attention's cache holds latents in the model's dtype (no int8)")
            write_latents(cache, entries, meta.writes)
        out = torch.empty(t, heads, self.v_dim, dtype=x.dtype, device=x.device)
        if cache is None:
            k, v = self.up_project(entries[:, 0])
            for i in range(meta.num_seqs):
                s, e = meta.query_start[i], meta.query_start[i + 1]
                out[s:e] = self._attend(q[s:e], k[s:e], v[s:e])
            return self.o_proj(out.reshape(t, heads * self.v_dim))
        done: list[int] = []
        if self.absorb:
            decodes = self._decodes(meta)
            if decodes is not None:
                done, rows, block_tables, lens = decodes
                q_rows = q if len(done) == t else q.index_select(0, rows)
                out.index_copy_(0, rows, self.absorbed_decode(q_rows, cache, block_tables, lens))
        for i in sorted(set(range(meta.num_seqs)) - set(done)):
            s, e = meta.query_start[i], meta.query_start[i + 1]
            latents = gather_kv(cache, meta.tables[i], meta.context_lens[i], meta.block_tables[i])[0]
            k, v = self.up_project(latents)
            out[s:e] = self._attend(q[s:e], k, v)
        return self.o_proj(out.reshape(t, heads * self.v_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of queries [Tq, H, D] (the last Tq of the keys) over keys [Tk, H, D] and values
        [Tk, H, d_v]; returns [Tq, H, d_v]."""
        return self.kernel(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=self.scale).transpose(0, 1)

    @staticmethod
    def _decodes(meta: AttentionMetadata) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The one-token sequences of a cached batch: (their indices, their rows, their block tables, their
        context lengths). ``AttentionMetadata.decode_batch`` when it holds them all (it leaves out a lone one)."""
        qs = meta.query_start
        idx = [i for i in range(meta.num_seqs) if qs[i + 1] - qs[i] == 1]
        if not idx:
            return None
        if meta.decode_batch is not None and len(meta.decode_batch[0]) == len(idx):
            return meta.decode_batch
        block_tables: torch.Tensor = meta.block_tables  # type: ignore[assignment]
        dev = block_tables.device
        rows = torch.tensor([qs[i] for i in idx], dtype=torch.long, device=dev)
        tables = block_tables.index_select(0, torch.tensor(idx, dtype=torch.long, device=dev))
        lens = torch.tensor([meta.context_lens[i] for i in idx], dtype=torch.long, device=dev)
        return idx, rows, tables, lens

    def absorbed_decode(self, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor) -> torch.Tensor:
        """One query per sequence, q [B, H, d_n + d_r] (rope part rotated), over each sequence's cached latents
        (``block_tables`` [B, max_blocks], ``context_lens`` [B]) in the latent space; returns [B, H, d_v]."""
        b, width = block_tables.shape
        length = width * cache.shape[1]
        w_uk, w_uv = (w.to(q.dtype) for w in self.absorbed_weights())
        q_latent = torch.einsum("bhn,hnr->bhr", q[..., : self.nope], w_uk)  # W_UK^T q_nope per head
        q_full = torch.cat((q_latent, q[..., self.nope:]), dim=-1)  # [B, H, r + d_r]
        latents = cache.index_select(0, block_tables.reshape(-1)).view(b, length, self.rank + self.rope)
        scores = torch.bmm(q_full, latents.transpose(1, 2)).float() * self.scale  # [B, H, L]
        visible = decode_visibility(context_lens, length, 0)
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        o_latent = torch.bmm(probs, latents[..., : self.rank])  # [B, H, r]: attention in the latent space
        return torch.einsum("bhr,hvr->bhv", o_latent, w_uv)  # W_UV o_latent per head


def set_absorbed(model: nn.Module, on: bool) -> None:
    """Decode every latent attention layer of ``model`` absorbed (True) or through the naive up-projection."""
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.absorb = on


