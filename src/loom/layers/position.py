"""Position encodings: RoPE (with PI / NTK / YaRN scaling), ALiBi, sinusoidal.

RoPE (Su et al. 2021) rotates each pair (x_i, x_{i + d/2}) of a query or key at position m by the
angle m * theta^(-2i/d) ("rotate-half" layout, as HF Llama stores Q/K). Because a rotation by m
followed by the inverse rotation by n is a rotation by m - n, q_m . k_n depends only on m - n.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loom.config import ModelConfig, RopeScaling
from loom.layers import fused


def rope_inv_freq(dim: int, base: float, scaling: RopeScaling | None = None,
                  max_position: int = 2048) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta_i = base^(-2i/dim) for i < dim/2, and the attention factor.

    Scaling (docs/ALGORITHMS.md, "Positions"):
      linear (position interpolation, Chen et al. 2306.15595): m -> m / s, i.e. theta_i / s.
      ntk (NTK-aware, bloc97): base' = base * s^(dim / (dim - 2)).
      yarn (Peng et al. 2309.00071): per frequency, blend the interpolated theta_i / s and the
        extrapolated theta_i with a linear ramp over the dimensions whose wavelength completes
        between beta_fast and beta_slow rotations in the original context L (dimension
        d_r = dim ln(L / (2 pi r)) / (2 ln base) completes r rotations in L tokens); cos/sin are scaled
        by sqrt(1/t) = 0.1 ln(s) + 1 (q and k both carry it, so the logits carry 1/t), unless the
        checkpoint names its own ``attention_factor``.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if scaling is not None and scaling.kind == "ntk":
        base = base * scaling.factor ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if scaling is None or scaling.kind == "ntk":
        return inv_freq, 1.0
    s = scaling.factor
    if scaling.kind == "linear":
        return inv_freq / s, 1.0
    if scaling.kind != "yarn":
        raise ValueError(f"unknown RoPE scaling {scaling.kind!r}")
    original = scaling.original_max_position or max_position

    def dim_of(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` full turns into `original` tokens.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    inv_freq = (inv_freq / s) * (1 - extrapolate) + inv_freq * extrapolate
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (the textbook form; ``apply`` folds the sign into sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


RopeTables = tuple[torch.Tensor, torch.Tensor]


INITIAL_POSITIONS = 4096  # rows of the cos/sin tables built up front


class RotaryEmbedding(nn.Module):
    """Applies RoPE to queries and keys given each token's absolute position.

    cos/sin tables are cached for the first positions (up to ``INITIAL_POSITIONS``; a model's context may
    be millions) and grown on demand, doubling, up to what is used. ``prepare``
    looks up one batch's rows once per forward; every layer then calls ``apply``, which computes
    x cos + rotate_half(x) sin as x cos + roll(x, d/2) sin', with sin' = [-sin_lo, sin_hi]
    (the same products in three ops instead of eight).
    """

    def __init__(self, head_dim: int, rotary_dim: int, base: float, max_position: int,
                 scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        inv_freq, self.attention_factor = rope_inv_freq(rotary_dim, base, scaling, max_position)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        sign = torch.ones(rotary_dim)
        sign[: rotary_dim // 2] = -1
        self.register_buffer("sign", sign, persistent=False)
        self._build(min(max_position, INITIAL_POSITIONS))

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.int64, device=self.inv_freq.device).float()
        freqs = torch.outer(t, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin_cached", emb.sin() * self.attention_factor, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> RopeTables:
        """cos and sin rows [T, rotary_dim] of the given positions."""
        self.ensure(int(positions.max()) + 1 if positions.numel() else 0)
        return self.cos_cached[positions].to(dtype), self.sin_cached[positions].to(dtype)

    def ensure(self, n: int) -> None:
        """Make the tables cover positions [0, n)."""
        if n > self.cos_cached.shape[0]:
            self._build(max(n, 2 * self.cos_cached.shape[0]))

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> RopeTables:
        """(cos, signed sin), each [T, 1, rotary_dim], ready to broadcast over heads."""
        cos, sin = self.cos_sin(positions, dtype)
        return cos.unsqueeze(1), (sin * self.sign.to(dtype)).unsqueeze(1)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> RopeTables:
        """``prepare`` without growing the tables (the caller has called ``ensure``): no value is read
        back to the host, so a CUDA graph can capture it."""
        cos, sin = self.cos_cached[positions].to(dtype), self.sin_cached[positions].to(dtype)
        return cos.unsqueeze(1), (sin * self.sign.to(dtype)).unsqueeze(1)

    def apply(self, x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
        """Rotate x [T, H, head_dim] by the positions ``tables`` were prepared for."""
        cos, sin = tables
        if self.rotary_dim == self.head_dim:
            return fused.rope(x, cos, sin)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((fused.rope_torch(rot, cos, sin), rest), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D], positions: [T]. Returns rotated copies."""
        tables = self.prepare(positions, q.dtype)
        return self.apply(q, tables), self.apply(k, tables)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2108.12409): m_h = 2^(-8h/n) for h = 1..n, n a power of two.

    Otherwise take the slopes of the nearest lower power of two n', then every other slope of
    2n' until there are num_heads of them (the paper's interleaving rule).
    """

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if num_heads & (num_heads - 1) == 0:
        return torch.tensor(power_of_two(num_heads))
    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """Bias -m_h (i - j) for query position i and key position j: [H, Tq, Tk]."""
    distance = (q_positions[:, None] - k_positions[None, :]).float()
    return -slopes.float()[:, None, None] * distance


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """PE[k, 2i] = sin(k / 10000^(2i/d)), PE[k, 2i+1] = cos(k / 10000^(2i/d)) (Vaswani et al. 2017)."""
    k = torch.arange(num_positions, dtype=torch.float64)[:, None]
    div = 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(k / div)
    pe[:, 1::2] = torch.cos(k / div)[:, : dim // 2]
    return pe.float()


def make_rotary(config: ModelConfig, local: bool = False) -> RotaryEmbedding | None:
    """The model's RoPE tables; ``local``: the sliding-window layers' own (base ``rope_local_theta``, no
    scaling, as Gemma 3 builds them), None when they share the global ones."""
    if config.position != "rope":
        return None
    if local:
        if config.rope_local_theta is None:
            return None
        return RotaryEmbedding(config.head_dim, config.rotary_dim, config.rope_local_theta,
                               config.max_position_embeddings)
    return RotaryEmbedding(config.head_dim, config.rotary_dim, config.rope_theta,
                           config.max_position_embeddings, config.rope_scaling)
