"""The decoder-only Transformer, assembled from layers by a ModelConfig.

    h_0 = embed(tokens) [projected in] [+ position table] [normed]
    pre-norm:  h = h + attn(norm(h));  h = h + mlp(norm(h))          (Llama, Mistral, Qwen2)
    post-norm: h = norm(h + attn(h));  h = norm(h + mlp(h))          (Vaswani et al. 2017)
    sandwich:  h = h + norm'(attn(norm(h)));  h = h + norm'(mlp(norm(h)))   (Gemma 2 / 3)
    logits = lm_head([project out] final_norm(h))

Inputs are a flat batch (see ``AttentionMetadata``); logits are computed only for the rows asked
for, because decoding needs just the last position of each sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers.attention import Attention, AttentionMetadata
from loom.layers.linear import Linear, linear
from loom.layers.mla import MLAttention
from loom.layers.mlp import make_mlp
from loom.layers.moe import MoE, make_moe, moe_row_splits
from loom.layers.norm import make_norm
from loom.layers.position import RopeTables, make_rotary, sinusoidal_table
from loom.models.random_init import fill_random

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def _embedding(num: int, dim: int, dtype: torch.dtype) -> nn.Embedding:
    # Uninitialized: weights are loaded (or init_random is called) right after construction.
    emb = nn.Embedding(num, dim, _weight=torch.empty(num, dim, dtype=dtype))
    emb.weight.requires_grad_(False)
    return emb


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: nn.Module | None, kernel: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.pre_norm = config.norm_placement in ("pre", "sandwich")
        self.attn_norm = make_norm(config).to(dtype)
        attention = MLAttention if config.is_mla else Attention
        self.attn = attention(config, layer, rotary, kernel, dtype)
        self.mlp_norm = make_norm(config).to(dtype)
        self.mlp = make_moe(config, dtype) if config.is_moe_layer(layer) else make_mlp(config, dtype)
        sandwich = config.norm_placement == "sandwich"
        self.post_attn_norm = make_norm(config).to(dtype) if sandwich else None
        self.post_mlp_norm = make_norm(config).to(dtype) if sandwich else None

    def forward(self, h: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None, rope: RopeTables | None = None) -> torch.Tensor:
        if self.post_attn_norm is not None:
            h = h + self.post_attn_norm(self.attn(self.attn_norm(h), meta, kv_cache, rope))
            return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h)))
        if self.pre_norm:
            h = h + self.attn(self.attn_norm(h), meta, kv_cache, rope)
            return h + self.mlp(self.mlp_norm(h))
        h = self.attn_norm(h + self.attn(h, meta, kv_cache, rope))
        return self.mlp_norm(h + self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, kernel: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed_tokens = _embedding(config.vocab_size, config.embedding_size, dtype)
        # OPT-350m: the embedding (and tied output layer) is narrower than the residual stream
        self.project_in = self.project_out = None
        if config.embedding_size != config.hidden_size:
            self.project_in = Linear(config.embedding_size, config.hidden_size, dtype=dtype)
            self.project_out = Linear(config.hidden_size, config.embedding_size, dtype=dtype)
        self.pos_embed: nn.Embedding | None = None
        if config.position == "learned":
            self.pos_embed = _embedding(config.max_position_embeddings + config.position_offset, config.hidden_size,
                                        dtype)
        elif config.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.max_position_embeddings,
                                                               config.hidden_size).to(dtype), persistent=False)
        self.embed_norm = make_norm(config).to(dtype) if config.embedding_norm else None  # BLOOM
        rotary = make_rotary(config)  # one table shared by all layers
        self.rotary = rotary
        # Gemma 3: the sliding-window layers rotate with their own base
        self.local_rotary = make_rotary(config, local=True)
        # which layers rotate with the local table (kept here: training may wrap the layers)
        self.local_layers = [self.local_rotary is not None and config.layer_window(i) is not None
                             for i in range(config.num_layers)]
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.local_rotary if self.local_layers[i] else rotary, kernel, dtype)
            for i in range(config.num_layers))
        self.norm = make_norm(config).to(dtype) if config.final_norm else None
        self.lm_head = None if config.tie_word_embeddings else Linear(config.embedding_size, config.vocab_size,
                                                                      dtype=dtype)
        # An orthogonal Q of the residual stream (models/rotation.py): the embedding's output is multiplied by
        # it and the last hidden state by Q^T before the final norm. None: no rotation.
        self.register_buffer("residual_rotation", None, persistent=False)
        # Frozen from the start (an inference model): training unfreezes what it trains (finetune/), and a
        # forward that wants no gradient runs the native kernels (layers/fused.use_native)
        self.requires_grad_(False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def fused_row_splits(self) -> dict[str, list[int]]:
        """Row sizes of the parts of fused parameters (q|k|v, gate|up), by parameter name."""
        c = self.config
        splits: dict[str, list[int]] = {}
        for i in range(c.num_layers):
            for suffix in ("weight", "bias"):
                splits[f"layers.{i}.attn.qkv_proj.{suffix}"] = [c.q_size, c.kv_size, c.kv_size]
                if c.gated_mlp:
                    splits[f"layers.{i}.mlp.gate_up_proj.{suffix}"] = [c.intermediate_size] * 2
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE):
                splits.update(moe_row_splits(f"layers.{i}.mlp", layer.mlp))
        return splits

    def replace_module(self, name: str, module: nn.Module) -> None:
        """Swap the submodule at dotted ``name`` (how quantization installs its linears). Setting
        ``lm_head`` on a tied model gives the output layer its own weights (e.g. quantized)."""
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, module)

    def set_kernel(self, name: str) -> None:
        for layer in self.layers:
            layer.attn.set_kernel(name)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ``input_ids``, times ``embedding_scale`` (in the model's dtype, as Gemma's
        scaled embedding computes it) when the model has one."""
        h = self.embed_tokens(input_ids)
        if self.config.embedding_scale is not None:
            h = h * torch.tensor(self.config.embedding_scale, dtype=h.dtype)
        return h

    def embed(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream's input: the tokens' embeddings (or ``inputs_embeds`` in their place),
        projected into the residual stream (``project_in``, OPT-350m), plus the position table (a learned
        one read at ``positions + position_offset``), normalized (``embed_norm``, BLOOM), times the residual
        rotation."""
        h = self.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.project_in is not None:
            h = self.project_in(h)
        if self.pos_embed is not None:
            offset = self.config.position_offset
            h = h + self.pos_embed(positions + offset if offset else positions)
        elif self.config.position == "sinusoidal":
            h = h + self.pos_table[positions]
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        return h if self.residual_rotation is None else h @ self.residual_rotation

    def cast_parameters(self, dtype: torch.dtype) -> None:
        """Parameters (and the position and rotation tables) to ``dtype``, in place; the rotary tables stay
        fp32, as in a model built in ``dtype``, and so do the scales of packed int8 linears."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        for name in ("pos_table", "residual_rotation"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).to(dtype))
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        e = self.embed_tokens
        weight = getattr(e, "weight", None)
        return weight.device if isinstance(weight, torch.Tensor) else e.device  # a quantized table: its codes' device

    def forward(self, input_ids: torch.Tensor | None, meta: AttentionMetadata,
                kv_caches: KVCaches | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm for a flat batch of T tokens. ``inputs_embeds``
        [T, hidden] replaces the lookup of ``input_ids`` (which may then be None): rows that are no token,
        such as a soft prompt's virtual tokens (finetune/prompt_tuning.py). They are what ``embed_tokens``
        gives, so the position table and the residual rotation still apply, as HF applies them to its
        ``inputs_embeds``."""
        x = input_ids if inputs_embeds is None else inputs_embeds
        if meta.positions.device != x.device:  # e.g. AttentionMetadata.uncached() for a GPU model
            meta = meta.to(x.device)
        h = self.embed(input_ids, meta.positions, inputs_embeds)
        rope = self.rotary.prepare(meta.positions, h.dtype) if self.rotary is not None else None
        local = self.local_rotary.prepare(meta.positions, h.dtype) if self.local_rotary is not None else None
        for i, layer in enumerate(self.layers):
            h = layer(h, meta, None if kv_caches is None else kv_caches[i], local if self.local_layers[i] else rope)
        if self.residual_rotation is not None:
            h = h @ self.residual_rotation.t()
        return h if self.norm is None else self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states after the final norm (projected out of the residual stream first when
        the embedding is narrower, OPT-350m)."""
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        if self.lm_head is None:
            return linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def logits(self, input_ids: torch.Tensor | None, meta: AttentionMetadata | None = None,
               kv_caches: KVCaches | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every token (a convenience for evaluation and tests)."""
        meta = meta or AttentionMetadata.uncached([(input_ids if inputs_embeds is None else inputs_embeds).shape[0]])
        return self.compute_logits(self(input_ids, meta, kv_caches, inputs_embeds))

    def init_random(self, seed: int = 0, std: float = 0.02) -> Transformer:
        """Random weights (normal(0, std); norms at 1, biases at 0) for tests and experiments."""
        fill_random(self, seed, std)
        return self
