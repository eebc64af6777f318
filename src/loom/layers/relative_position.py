"""T5's relative position bias (Raffel et al. 2020, arXiv 1910.10683, section 2.1; Shaw et al. 2018).

Instead of adding position vectors to the token embeddings, T5 adds a learned scalar per head to every
attention logit, chosen by the key's offset from the query, r = j - i (memory position minus query
position), put into one of ``num_buckets`` buckets:

    bidirectional (encoder):  half the buckets for r <= 0, half for r > 0: n = num_buckets / 2,
                              bucket = n [r > 0] + f(|r|)
    causal (decoder):         bucket = f(max(-r, 0))            (keys after the query share bucket 0; masked)
    f(a) = a                                                                         if a < n / 2 (exact)
         = min(n - 1, n / 2 + floor(ln(a / (n / 2)) / ln(max_distance / (n / 2)) * (n - n / 2)))  otherwise

so near offsets each have a bucket and far ones share logarithmically wider ones, every offset past
``max_distance`` the last. The bias b[bucket, head] is a [num_buckets, num_heads] table owned by the first
layer of each stack and shared by all its layers. Computed with the same float32 operations as Mesh
TensorFlow and transformers (``T5Attention._relative_position_bucket``), so bucket edges agree exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """The bucket (int64, in [0, num_buckets)) of each offset r = key position - query position."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        distance = torch.abs(relative_position)
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) = -inf for distance 0 is computed and discarded by the where (as in the reference)
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """The per-head bias table b [num_buckets, num_heads] and the bucketing of one stack (encoder: bidirectional,
    decoder: causal)."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads, dtype=dtype), requires_grad=False)

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        """b[bucket(r)] for offsets r of any shape [...] -> [..., num_heads]."""
        buckets = relative_position_bucket(relative_position, self.bidirectional, self.num_buckets, self.max_distance)
        return self.weight[buckets]

    def matrix(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """The bias [num_heads, Tq, Tk] of queries at ``query_positions`` [Tq] over keys at ``key_positions`` [Tk]."""
        return self(key_positions[None, :] - query_positions[:, None]).permute(2, 0, 1)
