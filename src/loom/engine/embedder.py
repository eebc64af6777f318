"""Embedding: texts or token ids -> one float32 vector each, from an encoder or from a decoder.

An encoder (``models/encoder.py``) runs padded batches, [B, T] padded to the batch's longest with the
padding masked out of attention and pooling. A decoder (loom's ``Transformer``) runs flat batches with no KV
cache, each sequence attending causally over its own tokens, and its final normed hidden states are pooled
(the last token by default: in a causal model only it has seen the whole text), as vLLM embeds with any
decoder. Inputs are sorted by length so that a batch's members are of similar length (sentence-transformers
does the same), and the vectors come back in input order; a vector does not depend on its batch.

Inputs longer than the model takes are refused (``ContextLengthError``) unless ``truncate`` is given, as
vLLM's ``truncate_prompt_tokens``: a text is then cut to its first tokens, keeping the special tokens the
tokenizer wraps it in (what sentence-transformers does), and token ids to their first ``truncate``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from loom.errors import ContextLengthError, InvalidPromptError, InvalidRequestError
from loom.layers.attention import AttentionMetadata
from loom.layers.pooling import (EmbeddingSpec, PoolingConfig, check_mode, l2_normalize, pool_flat, pool_padded,
                                 truncate_dimensions)
from loom.models.encoder import Encoder
from loom.models.transformer import Transformer
from loom.tokenizer import Tokenizer

EmbedInput = Union[str, Sequence[int]]


class Embedder:
    """A model, its tokenizer and how it embeds (``EmbeddingSpec``): ``tokenize`` then ``embed_ids``."""

    def __init__(self, model: Encoder | Transformer, tokenizer: Tokenizer, spec: EmbeddingSpec) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.is_encoder = isinstance(model, Encoder)

    @classmethod
    def for_decoder(cls, model: Transformer, tokenizer: Tokenizer, max_tokens: int | None = None) -> Embedder:
        """A decoder embeds by its last token's final normed state, L2-normalized (vLLM's defaults for a
        decoder), inputs of up to ``max_tokens`` (default: its context)."""
        c = model.config
        spec = EmbeddingSpec(PoolingConfig("last", normalize=True), max_tokens or c.max_position_embeddings,
                             c.hidden_size)
        return cls(model, tokenizer, spec)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def dimensions(self) -> int:
        return self.spec.dimensions

    # Tokens ---------------------------------------------------------------------------------------

    def _limit(self, truncate: int | None) -> int:
        """The most tokens an input may have: the model's, or ``truncate`` (-1: the model's)."""
        most = self.spec.max_tokens
        if truncate is None or truncate == -1:
            return most
        if not 1 <= truncate <= most:
            raise InvalidRequestError(f"truncate must be -1 (the model's maximum) or between 1 and the model's "
                                      f"maximum of {most} tokens, got {truncate}", param="truncate_prompt_tokens")
        return truncate

    def _text_ids(self, text: str, limit: int, truncate: bool) -> list[int]:
        ids = self.tokenizer.encode(text)  # InvalidPromptError for text that is not valid Unicode
        if len(ids) <= limit or not truncate:
            return ids
        backend = self.tokenizer.backend
        specials = backend.num_special_tokens_to_add(False)
        if limit <= specials:
            raise InvalidRequestError(f"truncate ({limit}) leaves no room for the text besides the {specials} "
                                      "special tokens", param="truncate_prompt_tokens")
        encoding = backend.encode(text, add_special_tokens=False)
        encoding.truncate(limit - specials)
        return backend.post_process(encoding).ids

    def tokenize(self, inputs: Sequence[EmbedInput], truncate: int | None = None,
                 field: str = "input") -> list[list[int]]:
        """Token ids of each input (text is encoded with the model's special tokens, token ids are kept),
        checked: none empty, every id in the vocabulary, none longer than the model takes (unless
        ``truncate``: at most that many tokens, -1 for the model's maximum). Errors name the input as
        ``field[i]`` and carry ``field`` as their param."""
        limit = self._limit(truncate)
        out = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                ids = self._text_ids(x, limit, truncate is not None)
            else:
                ids = [int(t) for t in x][:limit] if truncate is not None else [int(t) for t in x]
                if any(not 0 <= t < self.vocab_size for t in ids):
                    raise InvalidPromptError(f"{field}[{i}]: token ids must be in [0, {self.vocab_size})", param=field)
            if not ids:
                raise InvalidPromptError(f"{field}[{i}] is empty (it has no tokens)", param=field)
            if len(ids) > limit:
                raise ContextLengthError(f"{field}[{i}] has {len(ids)} tokens; this model embeds at most {limit} "
                                         "(ask for truncation to cut it: truncate / truncate_prompt_tokens)",
                                         param=field)
            out.append(ids)
        return out

    # Vectors --------------------------------------------------------------------------------------

    def _forward(self, batch: list[list[int]], mode: str) -> torch.Tensor:
        """Pooled [B, D] states of one batch."""
        dev = self.model.device
        if isinstance(self.model, Encoder):
            longest = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), longest), self.model.config.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            input_ids, mask = input_ids.to(dev), mask.to(dev)
            return pool_padded(self.model(input_ids, mask), mask, mode)
        lengths = [len(ids) for ids in batch]
        flat = torch.tensor([t for ids in batch for t in ids], dtype=torch.long, device=dev)
        return pool_flat(self.model(flat, AttentionMetadata.uncached(lengths)), lengths, mode)

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[Sequence[int]], *, pooling: str | None = None, normalize: bool | None = None,
                  dimensions: int | None = None, batch_size: int = 32) -> torch.Tensor:
        """[n, d] float32 (on the CPU) embeddings of token id lists (``tokenize``'s output).

        pooling:    "mean", "cls" or "last" (default: the model's)
        normalize:  L2-normalize each vector (default: as the model does)
        dimensions: keep the first d components (Matryoshka), then normalize; only for models that declare
                    they were trained for it
        """
        mode = pooling or self.spec.pooling.mode
        try:
            check_mode(mode)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="pooling") from None
        if dimensions is not None:
            try:
                self.spec.check_dimensions(dimensions)
            except ValueError as e:
                raise InvalidRequestError(str(e), param="dimensions") from None
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be positive, got {batch_size}", param="batch_size")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.spec.dimensions, dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            pooled = self._forward([list(ids[i]) for i in rows], mode)
            out[torch.tensor(rows, dtype=torch.long)] = pooled.float().cpu()
        if dimensions is not None:
            out = truncate_dimensions(out, dimensions)
        normalize = self.spec.pooling.normalize if normalize is None else normalize
        return l2_normalize(out) if normalize else out

    def embed(self, inputs: Sequence[EmbedInput], *, truncate: int | None = None, **options: object) -> torch.Tensor:
        """``embed_ids(tokenize(inputs, truncate), **options)``."""
        return self.embed_ids(self.tokenize(inputs, truncate), **options)  # type: ignore[arg-type]
