"""T5: the encoder-decoder Transformer of Raffel et al. 2020 ("Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", arXiv 1910.10683), as transformers' ``T5ForConditionalGeneration`` runs it.

    encoder (once per request, over the prompt x, bidirectional):
        h_0 = E[x];  per layer: h += SelfAttn(N(h), bias = b_enc[bucket(j - i)]);  h += FF(N(h))
        enc = N(h)
    decoder (token by token, over y = [decoder_start_token_id, generated...], causal):
        h_0 = E[y];  per layer: h += SelfAttn(N(h), bias = b_dec[bucket(j - i)])    keys/values: paged KV cache
                                h += CrossAttn(N(h), enc)                          keys enc W_k, values enc W_v
                                h += FF(N(h))
        logits = (N(h) * d_model^-1/2 if scale_decoder_outputs) W_out^T            W_out: E itself when tied

    attention:  softmax(q k^T + bias) v, no 1/sqrt(d_kv): T5's initialization folds it into W_q
    N:          T5LayerNorm, RMSNorm without mean subtraction or bias, statistics in fp32 (Zhang & Sennrich 2019)
    FF:         T5 v1.0 ("relu"): W_o relu(W_i x); T5 v1.1 / Flan-T5 ("gated-gelu"): W_o (gelu_tanh(W_i0 x) * W_i1 x)
    bias:       the relative position buckets of ``layers/relative_position.py``, a [buckets, heads] table in each
                stack's first layer, shared by all its layers; cross-attention has none

There are no biases anywhere and no position embeddings: positions enter only through the bucketed bias. The
embedding E is shared by encoder, decoder and (tied checkpoints) the output layer, where the d_model^-1/2
rescaling undoes the scale the tied embedding was trained at.

The decoder runs over loom's flat batches (``AttentionMetadata``): its self-attention writes and reads the
paged KV cache like a decoder-only model's, and the bias of each query is looked up from its absolute position
(``meta.positions``), so a prefill chunk, a batched decode step and a recomputation after preemption all see
the bias transformers computes with its contiguous cache. The cross-attention keys and values of a request
(``CrossKV``, computed once from the encoder's output by ``cross_kv``) are handed to each forward in a
``CrossBatch``; the engine keeps them per request (engine/encoder_decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.layers.attention import AttentionMetadata
from loom.layers.kernels import gather_kv, sdpa_attention, write_kv
from loom.layers.linear import Linear, linear
from loom.layers.mlp import MLP, GatedMLP
from loom.layers.norm import RMSNorm
from loom.layers.relative_position import RelativePositionBias
from loom.models.random_init import fill_random

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class T5Config:
    """Every knob of a T5 model (``config.json`` of ``model_type: t5`` / ``mt5``).

    ``tie_word_embeddings``: the output layer is the shared embedding (a checkpoint without ``lm_head.weight``);
    ``scale_decoder_outputs``: the decoder's output is multiplied by d_model^-1/2 before it (T5 v1.0's tied
    head; not Flan-T5 / T5 v1.1 / mT5, whose heads are their own). ``max_position_embeddings``: the longest
    encoder input and decoder sequence loom serves (``n_positions``; relative positions set no hard limit).

    The engine sizes its paged KV cache, which holds the decoder's self-attention keys and values, from
    ``num_layers``, ``num_kv_heads`` and ``head_dim`` as it does for a decoder-only ``ModelConfig``: here
    they name the decoder's.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm_eps: float = 1e-6
    activation: str = "relu"
    gated_mlp: bool = False
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    max_position_embeddings: int = 512
    architecture: str = "t5"
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
                    "relative_attention_num_buckets", "relative_attention_max_distance", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4 (two exact and two logarithmic "
                             "buckets per direction)")
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ValueError(f"decoder_start_token_id {self.decoder_start_token_id} is outside the vocabulary "
                             f"of {self.vocab_size}")

    # The decoder's geometry, under the names the engine and its KV cache read from a ModelConfig.
    @property
    def num_layers(self) -> int:
        return self.num_decoder_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def inner_size(self) -> int:
        """num_heads * d_kv: the width of q, k, v (not always d_model: t5-11b has 128 heads of 128 for 1024)."""
        return self.num_heads * self.d_kv

    num_experts = 0  # no MoE layers (the engine's stats ask)
    is_mla = False  # no latent attention (the KV cache asks)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(heads, key width, value width) of one decoder token's self-attention entry in one layer."""
        return self.num_heads, self.d_kv, self.d_kv

    def kv_bytes_per_token(self, bytes_per_element: float = 4) -> float:
        """Bytes of decoder self-attention K and V per decoder token (the paged cache)."""
        return 2 * self.num_decoder_layers * self.inner_size * bytes_per_element

    def cross_kv_bytes(self, source_len: int, bytes_per_element: float = 4) -> float:
        """Bytes of one request's cross-attention K and V, over its ``source_len`` encoder tokens."""
        return 2 * self.num_decoder_layers * self.inner_size * source_len * bytes_per_element

    def num_parameters(self) -> int:
        d, inner, f = self.d_model, self.inner_size, self.d_ff
        ff = (3 if self.gated_mlp else 2) * d * f
        encoder = self.num_encoder_layers * (4 * d * inner + ff + 2 * d)
        decoder = self.num_decoder_layers * (8 * d * inner + ff + 3 * d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        bias = 2 * self.relative_attention_num_buckets * self.num_heads
        return self.vocab_size * d + encoder + decoder + head + bias + 2 * d


@dataclass
class CrossKV:
    """One request's cross-attention keys and values for every decoder layer: k, v [layers, heads, S, d_kv]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def source_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class CrossBatch:
    """The cross-attention keys and values of each sequence of a flat batch (its request's ``CrossKV``).

    A batch of one-token sequences (every decode step, and the decoder's one-token prefill) attends in one call
    per layer over the sequences' keys stacked into [B, heads, S_max, d_kv], the keys past a shorter source
    masked; other batches attend sequence by sequence over their own keys.
    """

    def __init__(self, caches: list[CrossKV], query_start: list[int]) -> None:
        self.caches = caches
        self.query_start = query_start
        lengths = [c.source_len for c in caches]
        self.batched = len(caches) > 1 and query_start[-1] == len(caches)
        self.mask: torch.Tensor | None = None
        if self.batched and len(set(lengths)) > 1:
            keys = torch.arange(max(lengths), device=caches[0].k.device)
            self.mask = (keys[None, :] < torch.tensor(lengths, device=keys.device)[:, None])[:, None, None, :]

    def stacked(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values of every sequence, [B, heads, S_max, d_kv] each (zeros past a source)."""
        if self.mask is None:
            return (torch.stack([c.k[layer] for c in self.caches]), torch.stack([c.v[layer] for c in self.caches]))
        first = self.caches[0].k
        shape = (len(self.caches), first.shape[1], self.mask.shape[-1], first.shape[3])
        k = torch.zeros(shape, dtype=first.dtype, device=first.device)
        v = torch.zeros(shape, dtype=first.dtype, device=first.device)
        for i, c in enumerate(self.caches):
            k[i, :, :c.source_len] = c.k[layer]
            v[i, :, :c.source_len] = c.v[layer]
        return k, v


def _embedding(num: int, dim: int, dtype: torch.dtype) -> nn.Embedding:
    # Uninitialized: weights are loaded (or init_random is called) right after construction.
    emb = nn.Embedding(num, dim, _weight=torch.empty(num, dim, dtype=dtype))
    emb.weight.requires_grad_(False)
    return emb


def _mlp(config: T5Config, dtype: torch.dtype) -> nn.Module:
    cls = GatedMLP if config.gated_mlp else MLP
    return cls(config.d_model, config.d_ff, config.activation, bias=False, dtype=dtype)


class DecoderBias:
    """The decoder's self-attention bias for one forward, from the first layer's table and the batch's positions,
    shared by every layer (as transformers computes it in layer 0 and passes it on).

    ``decode``: for the batch's one-token sequences attended together (``meta.decode_batch``), the additive
    [B, heads, 1, L] bias over each block table's L slots, -inf past each context; ``per_seq``: for every other
    sequence i, [heads, n_i, context_i] (the causal mask is added by the kernel). ``block_size``: the paged
    cache's.
    """

    def __init__(self, table: RelativePositionBias, meta: AttentionMetadata, block_size: int,
                 dtype: torch.dtype) -> None:
        self.decode: torch.Tensor | None = None
        self.per_seq: dict[int, torch.Tensor] = {}
        device = meta.positions.device
        batched: set[int] = set()
        decodes = meta.decode_batch
        if decodes is not None:
            idx, rows, tables, lens = decodes
            length = tables.shape[1] * block_size
            keys = torch.arange(length, device=device)
            positions = meta.positions.index_select(0, rows)
            bias = table(keys[None, :] - positions[:, None]).permute(0, 2, 1).to(dtype)  # [B, heads, L]
            bias = bias.masked_fill(~(keys[None, :] < lens[:, None])[:, None, :], float("-inf"))
            self.decode = bias.unsqueeze(2)
            batched = set(idx)
        for i in range(meta.num_seqs):
            if i in batched:
                continue
            s, e = meta.query_start[i], meta.query_start[i + 1]
            keys = torch.arange(meta.context_lens[i], device=device)
            self.per_seq[i] = table.matrix(meta.positions[s:e], keys).to(dtype)


class T5EncoderLayer(nn.Module):
    """h += SelfAttn(N(h)) over the whole source (bidirectional, biased);  h += FF(N(h))."""

    def __init__(self, config: T5Config, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.inner_size
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps).to(dtype)
        self.qkv_proj = Linear(config.d_model, 3 * inner, dtype=dtype)
        self.o_proj = Linear(inner, config.d_model, dtype=dtype)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps).to(dtype)
        self.mlp = _mlp(config, dtype)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """h [S, d_model]; bias [heads, S, S]."""
        s = h.shape[0]
        q, k, v = self.qkv_proj(self.attn_norm(h)).view(s, 3, self.num_heads, self.d_kv).permute(1, 2, 0, 3)
        a = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias[None], scale=1.0)[0]
        h = h + self.o_proj(a.transpose(0, 1).reshape(s, -1))
        return h + self.mlp(self.mlp_norm(h))


class T5DecoderLayer(nn.Module):
    """h += SelfAttn(N(h)) (causal, biased, paged KV);  h += CrossAttn(N(h), enc);  h += FF(N(h))."""

    def __init__(self, config: T5Config, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        d, inner = config.d_model, config.inner_size
        self.attn_norm = RMSNorm(d, config.norm_eps).to(dtype)
        self.qkv_proj = Linear(d, 3 * inner, dtype=dtype)
        self.o_proj = Linear(inner, d, dtype=dtype)
        self.cross_norm = RMSNorm(d, config.norm_eps).to(dtype)
        self.cross_q_proj = Linear(d, inner, dtype=dtype)
        self.cross_kv_proj = Linear(d, 2 * inner, dtype=dtype)  # applied to the encoder's output, once per request
        self.cross_o_proj = Linear(inner, d, dtype=dtype)
        self.mlp_norm = RMSNorm(d, config.norm_eps).to(dtype)
        self.mlp = _mlp(config, dtype)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, cache: tuple[torch.Tensor, torch.Tensor] | None,
                bias: DecoderBias, cross: CrossBatch) -> torch.Tensor:
        h = h + self.self_attention(self.attn_norm(h), meta, cache, bias)
        h = h + self.cross_attention(self.cross_norm(h), cross)
        return h + self.mlp(self.mlp_norm(h))

    def self_attention(self, x: torch.Tensor, meta: AttentionMetadata,
                       cache: tuple[torch.Tensor, torch.Tensor] | None, bias: DecoderBias) -> torch.Tensor:
        t, hn, d = x.shape[0], self.num_heads, self.d_kv
        q, k, v = self.qkv_proj(x).view(t, 3, hn, d).unbind(1)  # [T, heads, d_kv] each
        if cache is not None and meta.cached:
            write_kv(cache[0], cache[1], k, v, meta.writes)
        else:
            cache = None
        out = torch.empty(t, hn, d, dtype=x.dtype, device=x.device)
        if bias.decode is not None:  # the one-token sequences, in one call over their block tables
            _, rows, tables, _ = meta.decode_batch  # type: ignore[misc]
            b, length = tables.shape[0], bias.decode.shape[-1]
            flat = tables.reshape(-1)
            keys = cache[0].index_select(0, flat).view(b, length, hn, d).transpose(1, 2)  # type: ignore[index]
            values = cache[1].index_select(0, flat).view(b, length, hn, d).transpose(1, 2)  # type: ignore[index]
            o = F.scaled_dot_product_attention(q.index_select(0, rows).unsqueeze(2), keys, values,
                                               attn_mask=bias.decode, scale=1.0)
            out.index_copy_(0, rows, o.squeeze(2))
        for i, seq_bias in bias.per_seq.items():
            s, e = meta.query_start[i], meta.query_start[i + 1]
            if cache is not None:
                length, table, row = meta.context_lens[i], meta.tables[i], meta.block_tables[i]
                ki, vi = gather_kv(cache[0], table, length, row), gather_kv(cache[1], table, length, row)
            else:
                ki, vi = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            out[s:e] = sdpa_attention(q[s:e].transpose(0, 1), ki, vi, scale=1.0, bias=seq_bias).transpose(0, 1)
        return self.o_proj(out.reshape(t, hn * d))

    def cross_attention(self, x: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        t, hn, d = x.shape[0], self.num_heads, self.d_kv
        q = self.cross_q_proj(x).view(t, hn, d)
        if cross.batched:  # one query per sequence
            k, v = cross.stacked(self.layer)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=cross.mask, scale=1.0).squeeze(2)
            return self.cross_o_proj(o.reshape(t, hn * d))
        out = torch.empty(t, hn, d, dtype=x.dtype, device=x.device)
        for i, c in enumerate(cross.caches):
            s, e = cross.query_start[i], cross.query_start[i + 1]
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], c.k[self.layer][None],
                                               c.v[self.layer][None], scale=1.0)[0]
            out[s:e] = o.transpose(0, 1)
        return self.cross_o_proj(out.reshape(t, hn * d))

    def project_cross_kv(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention keys and values [heads, S, d_kv] of the encoder's output [S, d_model]."""
        s = encoded.shape[0]
        k, v = self.cross_kv_proj(encoded).view(s, 2, self.num_heads, self.d_kv).permute(1, 2, 0, 3)
        return k, v


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config, dtype: torch.dtype) -> None:
        super().__init__()
        self.relative_bias = RelativePositionBias(config.relative_attention_num_buckets,
                                                  config.relative_attention_max_distance, config.num_heads,
                                                  bidirectional=True, dtype=dtype)
        self.layers = nn.ModuleList(T5EncoderLayer(config, dtype) for _ in range(config.num_encoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps).to(dtype)


class T5Decoder(nn.Module):
    def __init__(self, config: T5Config, dtype: torch.dtype) -> None:
        super().__init__()
        self.relative_bias = RelativePositionBias(config.relative_attention_num_buckets,
                                                  config.relative_attention_max_distance, config.num_heads,
                                                  bidirectional=False, dtype=dtype)
        self.layers = nn.ModuleList(T5DecoderLayer(config, i, dtype) for i in range(config.num_decoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps).to(dtype)


class T5(nn.Module):
    """T5ForConditionalGeneration: ``encode`` a request's source, ``cross_kv`` of it once, then ``forward`` flat
    decoder batches over the paged KV cache and ``compute_logits`` of the rows to sample."""

    def __init__(self, config: T5Config, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.shared = _embedding(config.vocab_size, config.d_model, dtype)
        self.encoder = T5Encoder(config, dtype)
        self.decoder = T5Decoder(config, dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.d_model, config.vocab_size, dtype=dtype)
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def output_weight(self) -> torch.Tensor:
        return self.shared.weight if self.lm_head is None else self.lm_head.weight

    def fused_row_splits(self) -> dict[str, list[int]]:
        """Row sizes of the parts of fused parameters (q|k|v, k|v, gate|up), by parameter name."""
        c, inner = self.config, self.config.inner_size
        splits: dict[str, list[int]] = {}
        for stack, n in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
            for i in range(n):
                splits[f"{stack}.layers.{i}.qkv_proj.weight"] = [inner] * 3
                if c.gated_mlp:
                    splits[f"{stack}.layers.{i}.mlp.gate_up_proj.weight"] = [c.d_ff] * 2
        for i in range(c.num_decoder_layers):
            splits[f"decoder.layers.{i}.cross_kv_proj.weight"] = [inner] * 2
        return splits

    # The encoder, once per request ----------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The encoder's output [S, d_model] (after its final norm) for one source of S token ids."""
        h = self.shared(input_ids.to(self.device))
        positions = torch.arange(h.shape[0], device=h.device)
        bias = self.encoder.relative_bias.matrix(positions, positions).to(h.dtype)  # layer 0's, for every layer
        for layer in self.encoder.layers:
            h = layer(h, bias)
        return self.encoder.norm(h)

    def cross_kv(self, encoded: torch.Tensor) -> CrossKV:
        """Every decoder layer's cross-attention keys and values of an encoder output [S, d_model]."""
        pairs = [layer.project_cross_kv(encoded) for layer in self.decoder.layers]
        return CrossKV(torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs]))

    # The decoder, over flat batches -----------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCaches | None,
                cross: CrossBatch) -> torch.Tensor:
        """Decoder hidden states [T, d_model] after the final norm for a flat batch of T decoder tokens; sequence i
        attends over its own earlier tokens (through ``kv_caches`` when the metadata has a slot mapping) and over
        ``cross.caches[i]``."""
        if meta.positions.device != input_ids.device:
            meta = meta.to(input_ids.device)
        h = self.shared(input_ids)
        block_size = kv_caches[0][0].shape[1] if kv_caches else 1
        bias = DecoderBias(self.decoder.relative_bias, meta, block_size, h.dtype)
        for i, layer in enumerate(self.decoder.layers):
            h = layer(h, meta, None if kv_caches is None else kv_caches[i], bias, cross)
        return self.decoder.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final decoder states: (h * d_model^-1/2 when ``scale_decoder_outputs``) W_out^T."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        return linear(hidden, self.shared.weight) if self.lm_head is None else self.lm_head(hidden)

    def logits(self, input_ids: torch.Tensor | list[int], decoder_input_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Decoder logits [T, vocab] of one source and a whole decoder input, no cache (for evaluation and tests)."""
        source = torch.as_tensor(input_ids, device=self.device)
        target = torch.as_tensor(decoder_input_ids, device=self.device)
        cross = CrossBatch([self.cross_kv(self.encode(source))], [0, target.shape[0]])
        return self.compute_logits(self(target, AttentionMetadata.uncached([target.shape[0]]), None, cross))

    def init_random(self, seed: int = 0, std: float = 0.02) -> T5:
        """Random weights (normal(0, std); norms at 1) for tests and experiments."""
        fill_random(self, seed, std)
        return self
