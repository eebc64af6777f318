"""Pooling token states into one sentence embedding, L2 normalization, and Matryoshka truncation.

Sentence-BERT (Reimers & Gurevych 2019, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
sec. 3) turns the token states h_1..h_n of a sequence into one vector u by one of

    mean:  u = (1 / n) * sum_{i <= n} h_i        over the real tokens only (padding is masked out)
    cls:   u = h_1                                the first token's state ([CLS] for BERT)
    last:  u = h_n                                the last real token's state: a causal decoder's only
                                                  token that has seen the whole text (what vLLM and
                                                  E5-Mistral / GTE-Qwen use for decoder embeddings)

and optionally scales u to unit length (u / ||u||_2) so that a dot product is the cosine similarity.
Matryoshka representation learning (Kusupati et al. 2022) trains a model so that the first d
components of u are themselves a good embedding: ``truncate_dimensions`` keeps them (normalize after).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "last")


def check_mode(mode: str) -> str:
    """``mode`` if it is a pooling mode loom has; a ValueError naming the choices otherwise."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLING_MODES)}")
    return mode


@dataclass(frozen=True)
class PoolingConfig:
    """How a model's token states become its embedding: the pooling mode and whether it is L2-normalized."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        check_mode(self.mode)


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, D] states of right-padded sequences and their [B, T] mask (1 for real tokens) -> [B, D].

    The mean is sum(h * mask) / max(sum(mask), 1e-9), as sentence-transformers computes it: padded
    positions add exact zeros, so a sequence pools the same alone as beside longer ones."""
    check_mode(mode)
    if mode == "cls":
        return hidden[:, 0]
    mask = mask.to(hidden.dtype)
    if mode == "mean":
        total = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
    last = mask.sum(dim=1).long() - 1  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_flat(hidden: torch.Tensor, lengths: Sequence[int], mode: str) -> torch.Tensor:
    """[T, D] states of a flat batch (sequence i is the next ``lengths[i]`` rows, as loom's decoder runs
    them) -> [B, D]."""
    check_mode(mode)
    out, start = [], 0
    for n in lengths:
        rows = hidden[start:start + n]
        out.append(rows.mean(dim=0) if mode == "mean" else rows[0] if mode == "cls" else rows[-1])
        start += n
    return torch.stack(out) if out else hidden.new_zeros(0, hidden.shape[-1])


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||_2, 1e-12) along the last dimension (sentence-transformers' Normalize module)."""
    return F.normalize(x, p=2.0, dim=-1)


def truncate_dimensions(x: torch.Tensor, dimensions: int) -> torch.Tensor:
    """The first ``dimensions`` components of each embedding (Matryoshka, Kusupati et al. 2022); normalize
    after truncating, since a unit vector's prefix is shorter than 1."""
    if not 1 <= dimensions <= x.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and {x.shape[-1]}, got {dimensions}")
    return x[..., :dimensions]


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a model declares about its embeddings (sentence-transformers' modules.json, 1_Pooling/config.json
    and sentence_bert_config.json for an encoder; loom's defaults for a decoder).

    pooling:               the mode and whether the result is L2-normalized
    max_tokens:            the longest input it embeds (longer ones are refused unless truncation is asked for)
    dimensions:            the embedding's size
    matryoshka_dimensions: None if the model was not trained for truncated embeddings (``dimensions`` is then
                           refused); the sizes it was trained for, or () for any size
    """

    pooling: PoolingConfig
    max_tokens: int
    dimensions: int
    matryoshka_dimensions: tuple[int, ...] | None = None

    def check_dimensions(self, dimensions: int) -> None:
        """A ValueError unless the model may give embeddings of ``dimensions`` components."""
        if self.matryoshka_dimensions is None:
            raise ValueError(f"this model does not support the dimensions parameter (it was not trained for "
                             f"truncated, Matryoshka embeddings); its embeddings have {self.dimensions} dimensions")
        allowed = self.matryoshka_dimensions
        if not 1 <= dimensions <= self.dimensions or (allowed and dimensions not in allowed):
            sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {self.dimensions}"
            raise ValueError(f"dimensions must be one of the sizes this model supports ({sizes}), got {dimensions}")
