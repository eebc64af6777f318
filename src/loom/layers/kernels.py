"""Attention kernels for one sequence, and the paged KV cache's scatter / gather.

All kernels take head-major tensors: q [Hq, Tq, D], k and v [Hkv, Tk, D] with Hq a multiple of
Hkv (GQA: query head h reads KV head h // (Hq / Hkv)). Queries are the last Tq of the Tk
positions whose keys are given, so query i sits at key index ``Tk - Tq + i``; it sees key j when

    j <= Tk - Tq + i                      (causal)
    j >  Tk - Tq + i - window             (sliding window, when set)

Every kernel computes softmax(q k^T * scale + bias) v over the visible keys and must equal
``naive_attention`` to fp32 rounding; a query that sees no key gets a zero output, never NaN.

- ``naive_attention``: the formula, materializing the [Hq, Tq, Tk] score matrix.
- ``flash_attention``: FlashAttention's tiling (Dao et al. 2205.14135) with the online softmax:
  per KV tile, m' = max(m, rowmax S), P = exp(S - m'), l' = e^(m - m') l + rowsum P,
  o' = e^(m - m') o + P V; the output is o / l. Never holds more than one tile of scores.
- ``split_kv_attention``: Flash-Decoding: KV split into chunks processed independently, each
  returning its normalized output o_s and log-sum-exp lse_s; combined with weights
  exp(lse_s - logsumexp_s lse_s).
- ``sdpa_attention``: torch's fused scaled_dot_product_attention (the fast path on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

KernelName = Literal["sdpa", "flash", "split_kv", "naive"]


def visibility_mask(tq: int, tk: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [Tq, Tk]: True where query i may attend to key j (bottom-right aligned causal)."""
    qi = torch.arange(tk - tq, tk, device=device)[:, None]
    kj = torch.arange(tk, device=device)[None, :]
    mask = kj <= qi
    if window is not None:
        mask &= kj > qi - window
    return mask


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=0)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    window: int | None = None, bias: torch.Tensor | None = None,
                    causal: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, computed literally in fp32. Returns [Hq, Tq, D]."""
    hq, tq, d = q.shape
    tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    groups = hq // k.shape[0]
    kf, vf = _expand_kv(k.float(), groups), _expand_kv(v.float(), groups)
    scores = q.float() @ kf.transpose(1, 2) * scale
    if bias is not None:
        scores = scores + bias.float()
    if causal or window is not None:
        visible = visibility_mask(tq, tk, window if causal else None, q.device)
        if not causal:
            visible = torch.ones_like(visible)
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    return (probs @ vf).to(q.dtype)


def _tile_scores(q: torch.Tensor, k_tile: torch.Tensor, j0: int, tk: int, scale: float,
                 window: int | None, bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Scaled, biased, masked scores of all queries against keys [j0, j0 + tile)."""
    tq = q.shape[1]
    s = q @ k_tile.transpose(1, 2) * scale
    tile = k_tile.shape[1]
    if bias is not None:
        s = s + bias[..., j0:j0 + tile].float()
    if causal:
        qi = torch.arange(tk - tq, tk, device=q.device)[:, None]
        kj = torch.arange(j0, j0 + tile, device=q.device)[None, :]
        visible = kj <= qi
        if window is not None:
            visible &= kj > qi - window
        s = s.masked_fill(~visible, float("-inf"))
    return s


def _online_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, j_start: int, j_end: int, tk: int,
                    tile: int, scale: float, window: int | None, bias: torch.Tensor | None,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running (m, l, o) of the online softmax over keys [j_start, j_end) in tiles; fp32."""
    hq, tq, d = q.shape
    m = torch.full((hq, tq, 1), float("-inf"), device=q.device)
    l = torch.zeros(hq, tq, 1, device=q.device)
    o = torch.zeros(hq, tq, v.shape[-1], device=q.device)
    for j0 in range(j_start, j_end, tile):
        j1 = min(j0 + tile, j_end)
        s = _tile_scores(q, k[:, j0:j1], j0, tk, scale, window, bias, causal)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all masked so far
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)
        l = alpha * l + p.sum(dim=-1, keepdim=True)
        o = alpha * o + p @ v[:, j0:j1]
        m = m_new
    return m, l, o


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    window: int | None = None, bias: torch.Tensor | None = None, causal: bool = True,
                    block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Tiled exact attention with the online softmax (FlashAttention, Algorithm 1)."""
    hq, tq, d = q.shape
    tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    groups = hq // k.shape[0]
    kf, vf = _expand_kv(k.float(), groups), _expand_kv(v.float(), groups)
    out = torch.empty(hq, tq, v.shape[-1], device=q.device)
    for i0 in range(0, tq, block_q):
        i1 = min(i0 + block_q, tq)
        qi = q[:, i0:i1].float()
        # Keys after the tile's last query are invisible under the causal mask: skip those tiles.
        last_visible = tk - tq + i1 if causal else tk
        tile_bias = None if bias is None else bias[:, i0:i1]
        # The tile's queries occupy key indices [tk - tq + i0, tk - tq + i1): treat them as the last
        # (i1 - i0) of a (last_visible)-long key range so the causal offsets stay right.
        _, l, o = _online_softmax(qi, kf, vf, 0, last_visible, last_visible, block_k, scale, window,
                                  tile_bias, causal)
        out[:, i0:i1] = torch.where(l > 0, o / l.clamp_min(1e-38), torch.zeros_like(o))
    return out.to(q.dtype)


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                       window: int | None = None, bias: torch.Tensor | None = None, causal: bool = True,
                       num_splits: int = 4, block_k: int = 64) -> torch.Tensor:
    """Flash-Decoding: independent partial softmaxes over KV chunks, merged by their log-sum-exp."""
    hq, tq, d = q.shape
    tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    groups = hq // k.shape[0]
    kf, vf = _expand_kv(k.float(), groups), _expand_kv(v.float(), groups)
    qf = q.float()
    chunk = max(1, math.ceil(tk / max(1, num_splits)))
    outs, lses = [], []
    for j0 in range(0, tk, chunk):
        j1 = min(j0 + chunk, tk)
        m, l, o = _online_softmax(qf, kf, vf, j0, j1, tk, block_k, scale, window, bias, causal)
        outs.append(torch.where(l > 0, o / l.clamp_min(1e-38), torch.zeros_like(o)))
        lses.append(torch.where(l > 0, m + torch.log(l.clamp_min(1e-38)), torch.full_like(l, float("-inf"))))
    if not outs:
        return torch.zeros(hq, tq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.stack(lses)  # [S, Hq, Tq, 1]
    total = torch.logsumexp(lse, dim=0)
    total_safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    weights = torch.exp(lse - total_safe)  # exp(-inf) = 0 for empty chunks
    return (weights * torch.stack(outs)).sum(dim=0).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                   window: int | None = None, bias: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """torch's fused attention; builds an explicit mask only when the plain causal flag cannot say it."""
    hq, tq, _ = q.shape
    tk = k.shape[1]
    gqa = hq != k.shape[0]
    if bias is None and window is None and (not causal or tq == 1 or tq == tk):
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal and tq > 1,
                                             scale=scale, enable_gqa=gqa)
        return out[0]
    mask = None
    if causal:
        visible = visibility_mask(tq, tk, window, q.device)
        mask = torch.zeros(tq, tk, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else mask + bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None] if mask is not None else None,
                                         scale=scale, enable_gqa=gqa)
    return out[0]


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "split_kv": split_kv_attention,
    "naive": naive_attention,
}


def get_kernel(name: str) -> Callable[..., torch.Tensor]:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}") from None


# Paged KV cache ------------------------------------------------------------------------------
#
# One layer's cache is a pair of tensors [num_blocks, block_size, Hkv, D] (token-major, as vLLM lays
# out its flash-attention cache). Token t of a batch is stored at flat slot s = block * block_size +
# offset (its slot mapping); a sequence's keys are found through its block table, the list of
# physical blocks holding its logical blocks in order. Token-major means a gathered run of blocks
# flattens to [tokens, Hkv, D] without a copy. A contiguous cache is the special case of one block
# per sequence as long as its context.


@dataclass(frozen=True)
class SlotWrites:
    """Where one forward's new keys/values go, worked out once and reused by every layer.

    Consecutive slots (a decode step, or a prefill chunk of one sequence) are one slice copy into
    the flat [num_blocks * block_size, Hkv, D] view; anything else is an index_copy_. Tokens with
    slot < 0 (padding) are dropped.
    """

    start: int = 0  # slice path: flat slots [start, end)
    end: int = 0
    slots: torch.Tensor | None = None  # indexed path
    keep: torch.Tensor | None = None
    device: torch.device = torch.device("cpu")  # where the slot mapping lives

    @classmethod
    def plan(cls, slot_mapping: torch.Tensor) -> SlotWrites:
        slots = slot_mapping.tolist()
        if slots and slots[0] >= 0 and slots == list(range(slots[0], slots[0] + len(slots))):
            return cls(start=slots[0], end=slots[0] + len(slots), device=slot_mapping.device)
        keep = None
        if any(x < 0 for x in slots):
            keep = slot_mapping >= 0
            slot_mapping = slot_mapping[keep]
        return cls(slots=slot_mapping, keep=keep, device=slot_mapping.device)

    @cached_property
    def flat_slots(self) -> torch.Tensor:
        """The destination slots as one index tensor (for caches that quantize on the way in). Only the
        indexed path knows the device; callers on a GPU pass slot mappings that take it (see ``plan``)."""
        if self.slots is not None:
            return self.slots
        return torch.arange(self.start, self.end, device=self.device)

    def kept(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of k and v that are written (padding dropped), in ``flat_slots`` order."""
        return (k, v) if self.keep is None else (k[self.keep], v[self.keep])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             writes: SlotWrites) -> None:
    """Store new keys/values [T, Hkv, D] into one layer's cache [num_blocks, block_size, Hkv, D]."""
    flat_k = k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])
    flat_v = v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])
    if writes.slots is None:
        flat_k[writes.start:writes.end] = k
        flat_v[writes.start:writes.end] = v
        return
    if writes.keep is not None:
        k, v = k[writes.keep], v[writes.keep]
    flat_k.index_copy_(0, writes.slots, k.to(k_cache.dtype))
    flat_v.index_copy_(0, writes.slots, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, blocks: list[int], length: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence, as a head-major view [Hkv, length, D].

    ``blocks`` is the sequence's block table. A single block is a view into the cache (no copy);
    otherwise the blocks are gathered, through ``index`` (the same table as a tensor on the cache's
    device, e.g. a row of the batch's block tables: no host-to-device copy per layer) when given.
    """
    block_size = cache.shape[1]
    n = -(-length // block_size)
    if n == 1:
        return cache[blocks[0], :length].transpose(0, 1)
    if index is not None and index.device == cache.device:
        index = index[:n]
    else:
        index = torch.tensor(blocks[:n], dtype=torch.long, device=cache.device)
    gathered = cache.index_select(0, index)  # [n, B, Hkv, D]
    return gathered.view(n * block_size, cache.shape[2], cache.shape[3])[:length].transpose(0, 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int) -> torch.Tensor:
    """One query per sequence (decode) over each sequence's cached keys, all sequences in one call.

    q [B, Hq, D]; block_tables [B, max_blocks] (padding entries may be any valid block);
    context_lens [B]; window 0 means none. Returns [B, Hq, D]. Runs the native kernel (which reads
    the blocks in place) on CPU tensors when it is built, else (and on a GPU) the PyTorch version.
    """
    native = q.device.type == "cpu" and use_native_decode_attention()
    fn = paged_decode_attention_native if native else paged_decode_attention_torch
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, window)


def use_native_decode_attention() -> bool:
    from loom import native

    return native.available()


def paged_decode_attention_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  window: int) -> torch.Tensor:
    """``paged_decode_attention`` by the native op (loom/native/paged_attention.cpp)."""
    return torch.ops.loom.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window)


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 window: int) -> torch.Tensor:
    """``paged_decode_attention`` in PyTorch: the blocks are gathered into a padded
    [B, Hkv, max_blocks * block_size, D] view and positions past each context are masked. Written in
    TorchScript's subset so the scripted decode step can call it."""
    b, hq, d = q.shape[0], q.shape[1], q.shape[2]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if b == 1 and block_tables.shape[1] == 1:  # one contiguous block: a view, no gather, no mask
        n = int(context_lens[0])
        start = 0 if window == 0 else max(0, n - window)
        k = k_cache[int(block_tables[0, 0]), start:n].transpose(0, 1).unsqueeze(0)
        v = v_cache[int(block_tables[0, 0]), start:n].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=hq != hkv)
        return out.squeeze(2)
    return paged_decode_attention_masked(q, k_cache, v_cache, block_tables, context_lens, scale, window)


def decode_visibility(context_lens: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """Boolean [B, length]: key j of sequence i is visible to its one new query (j < context length, and
    within the window when one is set)."""
    j = torch.arange(length, device=context_lens.device).unsqueeze(0)
    visible = j < context_lens.unsqueeze(1)
    if window > 0:
        visible = visible & (j >= context_lens.unsqueeze(1) - window)
    return visible


def paged_decode_attention_masked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  window: int, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``paged_decode_attention_torch``'s general case: every shape is fixed by the arguments' shapes and
    nothing is read back to the host, so a CUDA graph can capture it (see engine/step/cuda_graph.py).
    ``visible``: ``decode_visibility`` of these lengths and window, when the caller computed it once for
    all layers."""
    b, hq, d = q.shape[0], q.shape[1], q.shape[2]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    flat = block_tables.reshape(-1)
    length = block_tables.shape[1] * block_size
    k = k_cache.index_select(0, flat).view(b, length, hkv, d).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(b, length, hkv, d).transpose(1, 2)
    if visible is None:
        visible = decode_visibility(context_lens, length, window)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=scale,
                                         enable_gqa=hq != hkv)
    return out.squeeze(2)
