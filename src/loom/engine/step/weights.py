"""A Llama-shaped model's decode-time weights, named: what the scripted and native steps read.

The compiled steps do not walk ``nn.Module`` trees; they take each layer's norms, biases and linears
(as ``LinearSpec``: the form the linear's kernel reads) gathered once here. TorchScript compiles the
NamedTuples below, so this module has no ``from __future__ import annotations`` (see linear_spec.py).
"""

from dataclasses import dataclass, field, replace
from typing import Iterator, List, NamedTuple

import torch

from loom.layers.linear import Linear, PackedLinear
from loom.layers.linear_spec import LinearKind, LinearSpec
from loom.layers.moe import MoE
from loom.layers.parallel import QuantizedVocabHead, RowParallelLinear, VocabParallelHead
from loom.layers.quantized import PackedW8A8Linear, QuantizedLinear, W8A8Linear, linear_spec, packed_dense_spec
from loom.models.transformer import Transformer


class LayerWeights(NamedTuple):
    """One decoder layer: pre-norm RMSNorm weights, the fused q|k|v (+ bias) and gate|up linears, o and down."""

    attn_norm: torch.Tensor
    qkv: LinearSpec
    qkv_bias: torch.Tensor  # empty when the model has none
    o: LinearSpec
    mlp_norm: torch.Tensor
    gate_up: LinearSpec
    down: LinearSpec


class MoEWeights(NamedTuple):
    """One layer's mixture of experts (layers/moe.py); ``top_k`` 0 marks a dense layer (every list empty).
    ``counts`` is the module's ``expert_tokens`` buffer: the step adds its tokens to it."""

    router: LinearSpec
    gate_up: List[LinearSpec]  # one per expert
    down: List[LinearSpec]
    top_k: int
    normalize: bool
    shared: List[LinearSpec]  # [gate|up, down, gate] of the shared expert, or []
    counts: torch.Tensor


# An MoE layer's dense MLP slots (LayerWeights.gate_up / down) hold this empty spec.
NO_LINEAR = LinearSpec(LinearKind.DENSE, [torch.empty(0, 0)], 0, 0, 0)


def moe_weights(mlp: torch.nn.Module) -> MoEWeights:
    """The decode-time weights of a layer's MLP: an MoE's, or the dense layer's marker (top_k 0)."""
    if not isinstance(mlp, MoE):
        return MoEWeights(NO_LINEAR, [], [], 0, False, [], torch.empty(0, dtype=torch.long))
    shared = [] if mlp.shared_expert is None else [linear_spec(m) for m in (
        mlp.shared_expert.gate_up_proj, mlp.shared_expert.down_proj, mlp.shared_expert_gate)]
    return MoEWeights(linear_spec(mlp.router), [linear_spec(e.gate_up_proj) for e in mlp.experts],
                      [linear_spec(e.down_proj) for e in mlp.experts], mlp.top_k, mlp.normalize, shared,
                      mlp.expert_tokens)


def _mlp_linears(mlp: torch.nn.Module) -> list:
    """The linears of a layer's MLP: gate|up and down, or an MoE's router, experts and shared expert."""
    if not isinstance(mlp, MoE):
        return [mlp.gate_up_proj, mlp.down_proj]
    shared = [] if mlp.shared_expert is None else [mlp.shared_expert.gate_up_proj, mlp.shared_expert.down_proj,
                                                   mlp.shared_expert_gate]
    return [mlp.router] + [m for e in mlp.experts for m in (e.gate_up_proj, e.down_proj)] + shared


class AttentionShape(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float  # RMSNorm's epsilon
    scale: float  # 1 / sqrt(head_dim)
    windows: List[int]  # per layer: sliding window (0: none)


class LayerExtras(NamedTuple):
    """A Gemma-shaped layer's parts beyond LayerWeights (empty tensors where the model has none): per-head
    q / k RMSNorm weights, the sandwich norms of the attention and MLP outputs, and its RoPE table (0: the
    global one, 1: the sliding-window layers' own)."""

    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    post_mlp_norm: torch.Tensor
    rope: int


def has_extras(model: Transformer) -> bool:
    """Whether the model has any of Gemma 3's additions (QK-norm, sandwich norms, a scaled embedding, a
    local RoPE base, GELU-tanh gating): the native step computes them, the scripted step does not."""
    c = model.config
    return (c.qk_norm or c.norm_placement == "sandwich" or c.embedding_scale is not None
            or c.rope_local_theta is not None or c.activation != "silu")


def decoder_shaped(model: Transformer) -> bool:
    """Whether ``DecoderWeights.of`` takes this model: ``llama_shaped``, or Llama-shaped but for Gemma 3's
    additions (``has_extras``; only the native step runs those)."""
    c = model.config
    plain = c.norm_placement == "pre" and c.activation == "silu"
    gemma = c.norm_placement in ("pre", "sandwich") and c.activation in ("silu", "gelu_tanh")
    return (plain or gemma) and _llama_core(model)


def llama_shaped(model: Transformer) -> bool:
    """Whether the compiled CPU steps compute this model: pre-norm RMSNorm, SwiGLU (or a mixture of SwiGLU
    experts: the scripted step only), full rotate-half RoPE, no biases but q|k|v's, a plain embedding (no
    norm, no projections), fp32 or bf16 on the CPU, linears of loom's own kinds."""
    return _llama_core(model) and model.config.norm_placement == "pre" and not has_extras(model)


def _llama_core(model: Transformer) -> bool:
    c = model.config
    if not (c.norm == "rmsnorm" and c.final_norm and not c.norm_bias
            and not c.embedding_norm and c.embedding_size == c.hidden_size
            and c.gated_mlp and not c.mlp_bias and not c.attn_out_bias
            and c.position == "rope" and c.rotary_dim == c.head_dim and not c.qk_norm_full
            and not c.is_mla and c.moe_plain_routing
            and model.dtype in (torch.float32, torch.bfloat16) and model.device.type == "cpu"):
        return False
    linears = [m for l in model.layers for m in [l.attn.qkv_proj, l.attn.o_proj] + _mlp_linears(l.mlp)]
    kinds = (Linear, PackedLinear, QuantizedLinear, W8A8Linear, PackedW8A8Linear)
    head = model.lm_head
    if isinstance(head, VocabParallelHead) and head.bias is None:
        head = None  # a tensor-parallel shard of a dense output layer: its rows are a dense weight
    return all(type(unwrapped(m)) in kinds for m in linears + [head or Linear(1, 1)])


def unwrapped(layer: torch.nn.Module) -> torch.nn.Module:
    """The linear a tensor-parallel wrapper (layers/parallel.py) holds: its rank's columns (row-parallel, whose
    all-reduce the step calls itself) or rows (a quantized output layer's shard); other layers as they are."""
    return layer.inner if isinstance(layer, (RowParallelLinear, QuantizedVocabHead)) else layer


def tensor_parallel(model: Transformer) -> bool:
    """Whether ``model`` is one rank's shard (models/tensor_parallel.py)."""
    return any(isinstance(l.attn.o_proj, RowParallelLinear) for l in model.layers)


@dataclass(frozen=True)
class DecoderWeights:
    embed: torch.Tensor  # the lookup table [vocab, hidden]; [0, hidden] when the embedding is quantized (lookup)
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    head: LinearSpec  # the output layer (the embedding when tied)
    shape: AttentionShape
    rotation: torch.Tensor  # the residual stream's rotation (models/rotation.py), or an empty tensor
    extras: "list[LayerExtras] | None" = None  # Gemma-shaped models' extra parts (None: none)
    embedding_scale: float = 1.0
    activation: str = "silu"
    moe: list[MoEWeights] = field(default_factory=list)  # one per layer for an MoE model, [] for a dense one
    # A quantized embedding (layers/quantized.py: QuantizedEmbedding): the steps look the batch's rows up
    # through it and embed rows 0 .. B-1 of that small table. None: ``embed`` is the table.
    lookup: "torch.nn.Module | None" = None

    @classmethod
    def of(cls, model: Transformer) -> "DecoderWeights":
        if not decoder_shaped(model):
            raise ValueError("the compiled decode steps need a Llama-shaped fp32 or bf16 CPU model with dense or "
                             "weight-only quantized linears (see engine/step/weights.py: llama_shaped)")
        c = model.config
        empty = torch.empty(0, dtype=model.dtype)
        def qkv_bias(proj: torch.nn.Module) -> torch.Tensor:  # a packed layer's bias is inside its spec
            inside = isinstance(proj, (PackedLinear, PackedW8A8Linear))
            return proj.bias if proj.bias is not None and not inside else empty

        def mlp(l: torch.nn.Module) -> tuple[LinearSpec, LinearSpec]:
            return (NO_LINEAR, NO_LINEAR) if isinstance(l.mlp, MoE) else \
                (linear_spec(l.mlp.gate_up_proj), linear_spec(unwrapped(l.mlp.down_proj)))

        layers = [LayerWeights(l.attn_norm.weight, linear_spec(l.attn.qkv_proj), qkv_bias(l.attn.qkv_proj),
                               linear_spec(unwrapped(l.attn.o_proj)), l.mlp_norm.weight, *mlp(l)) for l in model.layers]
        if isinstance(model.lm_head, VocabParallelHead):  # a tensor-parallel shard: its rows' local logits
            head = LinearSpec(LinearKind.DENSE, [model.lm_head.weight], 0, 0, 0)
        elif model.lm_head is not None:
            head = linear_spec(unwrapped(model.lm_head))
        else:
            head = LinearSpec(LinearKind.DENSE, [model.embed_tokens.weight], 0, 0, 0)
        attn = model.layers[0].attn  # its head counts are this rank's under tensor parallelism
        shape = AttentionShape(attn.num_heads, attn.num_kv_heads, c.head_dim, float(c.norm_eps), attn.scale,
                               [l.attn.window or 0 for l in model.layers])
        rotation = model.residual_rotation if model.residual_rotation is not None else empty
        extras = None
        if has_extras(model):
            def weight(norm: "torch.nn.Module | None") -> torch.Tensor:
                return norm.weight if norm is not None else empty

            extras = [LayerExtras(weight(l.attn.q_norm), weight(l.attn.k_norm), weight(l.post_attn_norm),
                                  weight(l.post_mlp_norm), int(local))
                      for l, local in zip(model.layers, model.local_layers)]
        moe = [moe_weights(l.mlp) for l in model.layers] if c.num_experts else []
        lookup = None if isinstance(model.embed_tokens, torch.nn.Embedding) else model.embed_tokens
        embed = model.embed_tokens.weight if lookup is None else torch.empty(0, c.hidden_size, dtype=model.dtype)
        return cls(embed, layers, model.norm.weight, head, shape, rotation, extras, c.embedding_scale or 1.0,
                   c.activation, moe, lookup)

    def embedding_rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, table) for the steps' lookup: the tokens and the table, or, with a quantized embedding, the rows
        0 .. B-1 of the batch's dequantized rows."""
        if self.lookup is None:
            return tokens, self.embed
        return torch.arange(tokens.shape[0]), self.lookup(tokens).contiguous()

    def linears(self) -> Iterator[LinearSpec]:
        """Every linear of the step (experts included), the output layer last."""
        for i, layer in enumerate(self.layers):
            yield from (layer.qkv, layer.o)
            if self.moe and self.moe[i].top_k:
                m = self.moe[i]
                yield from [m.router] + m.gate_up + m.down + m.shared
            else:
                yield from (layer.gate_up, layer.down)
        yield self.head

    @property
    def has_dense(self) -> bool:
        """Whether any linear (the output layer included) is a plain dense weight."""
        return any(spec.kind == LinearKind.DENSE for spec in self.linears())

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def dense_layers(self) -> bool:
        """Whether the decoder layers' linears are dense (the output layer aside)."""
        return any(spec.kind == LinearKind.DENSE for l in self.layers for spec in (l.qkv, l.o, l.gate_up, l.down))

    def packed(self, rows: int) -> "DecoderWeights":
        """The same weights with every dense linear also held MKL-packed for products of ``rows`` rows
        (``packed_dense_spec``); quantized linears stay as they are."""
        def pack(spec: LinearSpec) -> LinearSpec:  # MKL packs fp32 weights only (not NO_LINEAR; experts stay as
            # they are: each sees a few of the batch's rows)
            dense_fp32 = spec.kind == LinearKind.DENSE and spec.tensors[0].dtype == torch.float32
            return packed_dense_spec(spec.tensors[0], rows) if dense_fp32 and spec.tensors[0].numel() else spec

        layers = [l._replace(qkv=pack(l.qkv), o=pack(l.o), gate_up=pack(l.gate_up), down=pack(l.down))
                  for l in self.layers]
        return replace(self, layers=layers, head=pack(self.head))

    @property
    def packed_bytes(self) -> int:
        """Bytes of the MKL-packed copies (the dense weights' size again)."""
        return sum(s.tensors[0].numel() * s.tensors[0].element_size() for s in self.linears()
                   if s.kind == LinearKind.DENSE_PACKED)
