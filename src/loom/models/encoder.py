"""The encoder-only Transformer (BERT: Devlin et al. 2019), for embeddings.

    h_0 = LayerNorm(E_word[x_i] + E_pos[i] + E_type[t_i])                  learned absolute positions
    per layer (post-LN, Vaswani et al. 2017):
        a = softmax(q k^T / sqrt(d) + mask) v                              bidirectional: every real token
        h = LayerNorm(h + a W_o^T + b_o)                                   sees every other real token
        h = LayerNorm(h + GELU(h W_up^T + b_up) W_down^T + b_down)         GELU(x) = x * Phi(x) (erf form)

Sequences are batched right-padded to the batch's longest, [B, T]; ``attention_mask`` (1 for real tokens,
0 for padding) removes the padded keys from every softmax, so a real token's state does not depend on how
much padding its batch carries. Padded positions get states too; poolers ignore them. The pooler head BERT
checkpoints carry (a tanh layer over [CLS], trained for next-sentence prediction) is not part of this
model: sentence embeddings pool the last hidden states (``loom.layers.pooling``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.layers.activation import get_activation
from loom.layers.linear import Linear
from loom.layers.norm import LayerNorm
from loom.models.random_init import fill_random


@dataclass(frozen=True)
class EncoderConfig:
    """Every knob of a BERT-style encoder (``config.json`` of ``model_type: bert``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"
    pad_token_id: int = 0
    architecture: str = "bert"
    name: str = ""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        get_activation(self.activation)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        h, f = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h
        return embeddings + self.num_layers * layer


def _table(num: int, dim: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialized: weights are loaded right after construction.
    return nn.Parameter(torch.empty(num, dim, dtype=dtype), requires_grad=False)


class EncoderLayer(nn.Module):
    """Bidirectional self-attention and a GELU MLP, each followed by residual + LayerNorm (post-LN)."""

    def __init__(self, config: EncoderConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = Linear(h, 3 * h, bias=True, dtype=dtype)  # q | k | v rows, one GEMM
        self.o_proj = Linear(h, h, bias=True, dtype=dtype)
        self.attn_norm = LayerNorm(h, config.norm_eps).to(dtype)
        self.up_proj = Linear(h, config.intermediate_size, bias=True, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, h, bias=True, dtype=dtype)
        self.mlp_norm = LayerNorm(h, config.norm_eps).to(dtype)
        self.act = get_activation(config.activation)

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """h [B, T, D]; key_mask [B, 1, 1, T] bool, True where a key is a real token (None: all are)."""
        b, t, d = h.shape
        qkv = self.qkv_proj(h).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_mask,
                                           scale=1.0 / math.sqrt(self.head_dim))
        h = self.attn_norm.add_forward(h, self.o_proj(a.transpose(1, 2).reshape(b, t, d)))
        return self.mlp_norm.add_forward(h, self.down_proj(self.act(self.up_proj(h))))


class Encoder(nn.Module):
    """Token ids [B, T] (+ mask, token types) -> last hidden states [B, T, D]."""

    def __init__(self, config: EncoderConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        h = config.hidden_size
        self.word_embeddings = _table(config.vocab_size, h, dtype)
        self.position_embeddings = _table(config.max_position_embeddings, h, dtype)
        self.token_type_embeddings = _table(config.type_vocab_size, h, dtype)
        self.embed_norm = LayerNorm(h, config.norm_eps).to(dtype)
        self.layers = nn.ModuleList(EncoderLayer(config, dtype) for _ in range(config.num_layers))

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.device

    def fused_row_splits(self) -> dict[str, list[int]]:
        """Row sizes of the parts of fused parameters (q | k | v), by parameter name."""
        h = self.config.hidden_size
        return {f"layers.{i}.qkv_proj.{s}": [h, h, h] for i in range(self.config.num_layers)
                for s in ("weight", "bias")}

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """h_0 = LayerNorm(word + token type + position); positions count from 0 in every row."""
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed the model's {self.config.max_position_embeddings} positions")
        types = self.token_type_embeddings[0] if token_type_ids is None else self.token_type_embeddings[token_type_ids]
        h = self.word_embeddings[input_ids] + types + self.position_embeddings[:t]  # HF's order of the sums
        return self.embed_norm(h)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, T, D] of right-padded ``input_ids`` [B, T]; ``attention_mask`` [B, T] is 1
        for real tokens (None: every token is real)."""
        h = self.embed(input_ids, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # a batch without padding attends with no mask at all (SDPA's unmasked kernel is the faster one)
        key_mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = layer(h, key_mask)
        return h

    def init_random(self, seed: int = 0, std: float = 0.02) -> Encoder:
        """Random weights (normal(0, std); LayerNorms at weight 1, bias 0) for tests and experiments."""
        fill_random(self, seed, std)
        return self
