"""Configuration: the model's architecture and the engine's every setting.

``ModelConfig`` describes Llama, Mistral, Qwen2 and the textbook variants the seeds discuss
(post-norm, LayerNorm, GELU/ReLU MLPs, ALiBi, sinusoidal or learned positions). Loaders turn
GGUF metadata or a Hugging Face ``config.json`` into a ``ModelConfig``; the model is assembled
from it and nothing else.

``EngineConfig`` (at the end) holds how a model is loaded and served: weights, device, decode step,
and the cache, scheduler, speculative decoding and KV policy configs, each a frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Union

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
NormKind = Literal["rmsnorm", "layernorm"]
NormPlacement = Literal["pre", "post", "sandwich"]
PositionKind = Literal["rope", "alibi", "sinusoidal", "learned", "none"]


ROPE_SCALING_KINDS = ("linear", "ntk", "yarn")

# The longest context loom accepts (16M tokens): far past any released model's, and low enough that a
# file claiming more is refused before its RoPE tables or KV cache are sized from the claim.
MAX_CONTEXT = 1 << 24


@dataclass(frozen=True)
class RopeScaling:
    """Context extension for RoPE (docs/ALGORITHMS.md, "Positions").

    kind: "linear" (position interpolation, Chen et al. 2306.15595: m -> m / factor), "ntk"
    (NTK-aware base change, base' = base * factor^(d / (d - 2))) or "yarn" (Peng et al. 2309.00071:
    ramp between interpolated and extrapolated frequencies, cos/sin scaled by 0.1 ln(factor) + 1).

    original_max_position: the context the model was trained with, L (YaRN's ramp is measured in
    rotations over L; the scaled model's context is L * factor). None: the config's
    ``max_position_embeddings``. beta_fast / beta_slow: YaRN's ramp ends, in rotations over L.
    attention_factor: YaRN's cos/sin scale when a checkpoint names it (None: 0.1 ln(factor) + 1).
    truncate: YaRN rounds the ramp's ends to whole dimensions (transformers' default; False keeps
    them fractional).
    """

    kind: Literal["linear", "ntk", "yarn"]
    factor: float
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; choose one of {', '.join(ROPE_SCALING_KINDS)} "
                             "(or none)")
        if not math.isfinite(self.factor) or self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be a positive number, got {self.factor}")
        if self.original_max_position is not None and not 1 <= self.original_max_position <= MAX_CONTEXT:
            raise ValueError(f"original context must be between 1 and {MAX_CONTEXT} tokens, "
                             f"got {self.original_max_position}")
        if not (_positive(self.beta_fast) and _positive(self.beta_slow)):
            raise ValueError(f"YaRN beta_fast and beta_slow must be positive, got {self.beta_fast}, {self.beta_slow}")
        if self.attention_factor is not None and not _positive(self.attention_factor):
            raise ValueError(f"attention_factor must be positive, got {self.attention_factor}")


def _positive(x: float) -> bool:
    """Whether ``x`` is a finite number above zero (NaN is not)."""
    return math.isfinite(x) and x > 0


# What a caller may ask of a model's RoPE scaling: None keeps the file's, "none" switches it off,
# a RopeScaling replaces it.
RopeScalingOverride = Union["RopeScaling", Literal["none"], None]


def scaled_context(max_position: int, scaling: RopeScaling | None) -> tuple[int, RopeScaling | None]:
    """The context a checkpoint's RoPE scaling gives, and the scaling with its original context filled in.

    A checkpoint's ``max_position_embeddings`` is the trained context L unless its scaling names
    another (``original_max_position``, e.g. Qwen2.5 YaRN configs keep both at 32768 and mean
    4 x 32768); with factor s the model serves max(max_position, L * s) tokens.
    """
    if scaling is None:
        return max_position, None
    original = scaling.original_max_position or max_position
    filled = dataclasses.replace(scaling, original_max_position=original)
    return max(max_position, int(original * scaling.factor)), filled


def with_rope_scaling(config: ModelConfig, scaling: RopeScalingOverride) -> ModelConfig:
    """``config`` with its RoPE scaling replaced (``load_model(..., rope_scaling=...)``, ``--rope-scaling``).

    The original context L is the override's ``original_max_position``, else the checkpoint's own
    scaling's, else the checkpoint's context; the new context is L * max(factor, 1), so SmolLM2
    (8192) with factor 2 accepts 16,384-token prompts. "none" drops a checkpoint's scaling and
    returns to its original context. None returns ``config`` itself.
    """
    if scaling is None:
        return config
    if scaling == "none":
        if config.rope_scaling is None:
            return config
        context = config.rope_scaling.original_max_position or config.max_position_embeddings
        return dataclasses.replace(config, rope_scaling=None, max_position_embeddings=context)
    if not isinstance(scaling, RopeScaling):
        raise ValueError(f"rope_scaling must be a RopeScaling, 'none' or None, got {scaling!r}")
    if config.position != "rope":
        raise ValueError(f"RoPE scaling needs a RoPE model; this one uses {config.position!r} positions")
    file_original = config.rope_scaling.original_max_position if config.rope_scaling is not None else None
    original = scaling.original_max_position or file_original or config.max_position_embeddings
    return dataclasses.replace(config, rope_scaling=dataclasses.replace(scaling, original_max_position=original),
                               max_position_embeddings=int(original * max(scaling.factor, 1.0)))


def parse_rope_scaling(kind: str | None, factor: float | None = None, original_context: int | None = None,
                       beta_fast: float = 32.0, beta_slow: float = 1.0) -> RopeScalingOverride:
    """The override the CLI's ``--rope-scaling KIND --rope-factor F [--rope-original-context N]`` asks for."""
    if kind is None:
        if factor is not None or original_context is not None:
            raise ValueError("--rope-factor / --rope-original-context need --rope-scaling linear|ntk|yarn")
        return None
    if kind == "none":
        return "none"
    if factor is None:
        raise ValueError(f"--rope-scaling {kind} needs --rope-factor")
    return RopeScaling(kind, float(factor), original_context, beta_fast, beta_slow)  # type: ignore[arg-type]


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Transformer.

    Attention: ``num_heads`` query heads read ``num_kv_heads`` key/value heads; query head h reads
    KV head ``h // (num_heads // num_kv_heads)`` (MHA when equal, MQA when one, GQA between).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: same as num_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4 * hidden_size
    # MLP: gated (SwiGLU / GeGLU: down(act(gate x) * up x)) or plain (down(act(up x))).
    activation: Activation = "silu"
    gated_mlp: bool = True
    # Normalization and its placement: pre-norm x + f(norm(x)), post-norm norm(x + f(x)), sandwich
    # x + norm'(f(norm(x))) (Gemma 2/3: a second norm on each block's output before the residual add).
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    norm_placement: NormPlacement = "pre"
    final_norm: bool = True
    # Positions.
    position: PositionKind = "rope"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None: the whole head_dim; fewer rotates only the first dims
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    # Learned positions: position p reads row p + position_offset of the table, which has
    # max_position_embeddings + position_offset rows (OPT's table starts at row 2).
    position_offset: int = 0
    # Biases.
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool | None = None  # None: LayerNorm has a bias, RMSNorm does not
    # Embeddings.
    tie_word_embeddings: bool = False
    embedding_scale: float | None = None  # h_0 = embed(tokens) x scale (Gemma: sqrt(hidden_size)); None: 1
    # Attention extras: RMSNorm over each head's query and key before RoPE (Gemma 3, Qwen3), the softmax
    # scale (None: 1 / sqrt(head_dim); Gemma: query_pre_attn_scalar^-1/2), and the RoPE base of the
    # sliding-window layers when it differs from the global layers' (Gemma 3: 10,000 against 1,000,000).
    qk_norm: bool = False
    attn_scale: float | None = None
    rope_local_theta: float | None = None
    # A norm (``norm``'s kind) of the embedding's output before the first layer (BLOOM's
    # word_embeddings_layernorm).
    embedding_norm: bool = False
    # Width of the token embedding and of the (tied) output layer; None: hidden_size. Otherwise
    # linears without bias project the embedding into the residual stream and the final hidden state
    # out of it (OPT-350m's word_embed_proj_dim: project_in, project_out).
    embedding_size: int | None = None
    # QK-norm over whole projections (OLMoE): RMSNorm of the q projection over its q_size outputs and of
    # the k projection over its kv_size outputs, before RoPE (layers/attention.py: FullQKNorm).
    qk_norm_full: bool = False
    # Mixture of experts (layers/moe.py; Shazeer et al. 1701.06538, Mixtral 2401.04088): an MoE layer's MLP
    # is ``num_experts`` SwiGLU experts of ``moe_intermediate_size``, of which a softmax router picks
    # ``num_experts_per_tok`` per token. 0 experts: every MLP is dense (the default).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = True  # renormalize the k chosen weights to sum to 1 (Mixtral: always)
    shared_expert_intermediate_size: int = 0  # > 0: a sigmoid-gated shared SwiGLU expert (Qwen2-MoE)
    moe_layers: tuple[bool, ...] | None = None  # which layers are MoE (None: all, when num_experts > 0)
    # DeepSeek's routers (layers/moe.py: ``route``): scores softmax(W_r x) or sigmoid(W_r x) ("sigmoid": V3);
    # ``moe_score_bias`` adds a learned per-expert bias to the scores when choosing, not to the weights
    # (V3's e_score_correction_bias); group-limited routing splits the experts into ``moe_groups`` groups and
    # chooses among the best ``moe_topk_groups`` groups only (a group's score: its best expert's under softmax,
    # its best two experts' sum under sigmoid); the chosen weights are multiplied by ``moe_routed_scale``
    # (routed_scaling_factor). ``shared_expert_gated`` False: the shared expert is added as is (DeepSeek's
    # n_shared_experts experts, one MLP of their summed width) instead of through Qwen2-MoE's sigmoid gate.
    moe_scoring: Literal["softmax", "sigmoid"] = "softmax"
    moe_score_bias: bool = False
    moe_groups: int = 1
    moe_topk_groups: int = 1
    moe_routed_scale: float = 1.0
    shared_expert_gated: bool = True
    # Multi-head latent attention (layers/mla.py; DeepSeek-V2, 2405.04434): kv_lora_rank > 0 makes every layer
    # MLA. Keys and values are up-projected from a per-token latent c_kv of kv_lora_rank values; each head's
    # query and key are [nope (qk_nope_head_dim) | rope (qk_rope_head_dim)], the rope part of the key one
    # shared head; values have v_head_dim. The cache holds c_kv and the rotated rope key per token and layer.
    # q_lora_rank > 0: queries go through a low-rank latent too (q_a_proj -> RMSNorm -> q_b_proj). head_dim is
    # then qk_nope + qk_rope (the softmax scale's d) and rotary_dim qk_rope. rope_interleave: the rope dims
    # rotate adjacent pairs (x_2i, x_2i+1), as DeepSeek's checkpoints store them, instead of halves.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # Layers the checkpoint stores after the decoder's that loom does not run: DeepSeek-V3's multi-token-prediction
    # module (num_nextn_predict_layers, a training-time extra head; inference reads the main model only).
    unused_stored_layers: int = 0
    # Sliding-window attention (Mistral): query i sees keys j with i - window < j <= i.
    sliding_window: int | None = None
    sliding_window_layers: tuple[bool, ...] | None = None  # None: every layer uses the window
    # Token ids the model was trained with.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Where the config came from (e.g. "llama", "qwen2"); informational.
    architecture: str = "llama"
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.kv_lora_rank > 0:  # MLA: the query/key head is [nope | rope], RoPE on the rope part only
            if self.head_dim is None:
                self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.rotary_dim is None:
                self.rotary_dim = self.qk_rope_head_dim
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.norm_bias is None:
            self.norm_bias = self.norm == "layernorm"
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if self.sliding_window_layers is not None:
            self.sliding_window_layers = tuple(bool(b) for b in self.sliding_window_layers)
        if self.moe_intermediate_size is None and self.num_experts > 0:
            self.moe_intermediate_size = self.intermediate_size
        if self.moe_layers is not None:
            self.moe_layers = tuple(bool(b) for b in self.moe_layers)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "embedding_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.position == "rope" and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        if self.sliding_window_layers is not None and len(self.sliding_window_layers) != self.num_layers:
            raise ValueError("sliding_window_layers needs one entry per layer")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"RoPE scaling needs RoPE positions, got position {self.position!r}")
        if not 1 <= self.max_position_embeddings <= MAX_CONTEXT:
            raise ValueError(f"max_position_embeddings must be between 1 and {MAX_CONTEXT} (2^24), "
                             f"got {self.max_position_embeddings}")
        if not _positive(self.rope_theta):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if self.rope_local_theta is not None and not _positive(self.rope_local_theta):
            raise ValueError(f"rope_local_theta must be a positive number, got {self.rope_local_theta}")
        for name in ("embedding_scale", "attn_scale"):
            if getattr(self, name) is not None and not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.qk_norm and self.norm != "rmsnorm":
            raise ValueError("qk_norm is an RMSNorm over each head (it needs norm 'rmsnorm')")
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise ValueError(f"norm_eps must be a finite number >= 0, got {self.norm_eps}")
        if self.position_offset and self.position != "learned":
            raise ValueError(f"position_offset needs learned positions, got position {self.position!r}")
        if not 0 <= self.position_offset <= MAX_CONTEXT:
            raise ValueError(f"position_offset must be between 0 and {MAX_CONTEXT}, got {self.position_offset}")
        self._validate_moe()
        self._validate_mla()

    def _validate_mla(self) -> None:
        sizes = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if any(getattr(self, name) < 0 for name in sizes):
            raise ValueError(f"{', '.join(sizes)} must be >= 0")
        if not self.is_mla:
            if self.q_lora_rank or self.qk_nope_head_dim or self.qk_rope_head_dim or self.v_head_dim \
                    or self.rope_interleave:
                raise ValueError("q_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim and rope_interleave "
                                 "describe latent attention: they need kv_lora_rank > 0")
            return
        r = self.qk_rope_head_dim
        if r <= 0 or r % 2 or self.v_head_dim <= 0:
            raise ValueError(f"latent attention needs an even qk_rope_head_dim > 0 and v_head_dim > 0, got {r} and "
                             f"{self.v_head_dim}")
        if self.head_dim != self.qk_nope_head_dim + r or self.rotary_dim != r:
            raise ValueError(f"latent attention: head_dim must be qk_nope_head_dim + qk_rope_head_dim "
                             f"({self.qk_nope_head_dim + r}) and rotary_dim qk_rope_head_dim ({r}), got "
                             f"{self.head_dim} and {self.rotary_dim}")
        if self.position != "rope":
            raise ValueError(f"latent attention rotates its decoupled key: it needs RoPE, got {self.position!r}")
        unsupported = [name for name in ("qk_norm", "qk_norm_full", "sliding_window", "rope_local_theta")
                       if getattr(self, name)]
        if unsupported:
            raise ValueError(f"latent attention does not implement {', '.join(unsupported)}")

    def _validate_moe(self) -> None:
        e, k = self.num_experts, self.num_experts_per_tok
        if e < 0 or k < 0 or self.shared_expert_intermediate_size < 0:
            raise ValueError("num_experts, num_experts_per_tok and shared_expert_intermediate_size must be >= 0, "
                             f"got {e}, {k}, {self.shared_expert_intermediate_size}")
        if e == 0:
            if k or self.moe_layers is not None or self.shared_expert_intermediate_size:
                raise ValueError("num_experts_per_tok, moe_layers and a shared expert need num_experts > 0")
            if not self.moe_plain_routing:
                raise ValueError("moe_scoring, moe_score_bias, moe_groups, moe_topk_groups and moe_routed_scale "
                                 "describe a router: they need num_experts > 0")
            return
        if not 1 <= k <= e:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts ({e}), got {k}")
        if self.moe_intermediate_size is None or self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if not self.gated_mlp or self.mlp_bias:
            raise ValueError("experts are gated MLPs without biases: MoE needs gated_mlp=True and mlp_bias=False")
        if self.moe_layers is not None and len(self.moe_layers) != self.num_layers:
            raise ValueError("moe_layers needs one entry per layer")
        if self.moe_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_scoring must be 'softmax' or 'sigmoid', got {self.moe_scoring!r}")
        g, tg = self.moe_groups, self.moe_topk_groups
        if g < 1 or e % g or not 1 <= tg <= g:
            raise ValueError(f"group-limited routing needs moe_groups dividing num_experts ({e}) and 1 <= "
                             f"moe_topk_groups <= moe_groups, got {g} and {tg}")
        if g > 1 and self.moe_scoring == "sigmoid" and e // g < 2:
            raise ValueError("sigmoid routing scores a group by its best two experts: groups need >= 2 experts")
        if k > tg * (e // g):
            raise ValueError(f"num_experts_per_tok {k} exceeds the experts of the {tg} chosen groups ({tg * (e // g)})")
        if not _positive(self.moe_routed_scale):
            raise ValueError(f"moe_routed_scale must be a positive number, got {self.moe_routed_scale}")

    # Derived sizes -------------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (layers/mla.py)."""
        return self.kv_lora_rank > 0

    @property
    def attn_out_size(self) -> int:
        """Inputs of the attention's output projection: heads x the value head's width."""
        return self.num_heads * (self.v_head_dim if self.is_mla else self.head_dim)

    @property
    def moe_plain_routing(self) -> bool:
        """Whether the router is the plain softmax top-k (Mixtral, Qwen-MoE, OLMoE), with a shared expert, if any,
        behind its sigmoid gate: what the compiled decode steps compute."""
        return (self.moe_scoring == "softmax" and not self.moe_score_bias and self.moe_groups == 1
                and self.moe_topk_groups == 1 and self.moe_routed_scale == 1.0 and self.shared_expert_gated)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(heads, key width, value width) of one token's entry in one layer's KV cache: (kv_heads, head_dim,
        head_dim), or for latent attention one "head" of [c_kv | rotated k_rope] (kv_lora_rank + qk_rope_head_dim)
        and no value (the values are c_kv, read from the same entry)."""
        if self.is_mla:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0
        return self.num_kv_heads, self.head_dim, self.head_dim  # type: ignore[return-value]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and not self.sliding_window_layers[layer]:
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is a mixture of experts."""
        return self.num_experts > 0 and (self.moe_layers is None or self.moe_layers[layer])

    def kv_bytes_per_token(self, bytes_per_element: float = 4) -> float:
        """KV cache bytes per token: layers x kv_heads x head_dim x 2 (K and V) x element size; for latent
        attention layers x (kv_lora_rank + qk_rope_head_dim) x element size (``kv_cache_shape``)."""
        heads, k, v = self.kv_cache_shape()
        return self.num_layers * heads * (k + v) * bytes_per_element

    def mha_kv_bytes_per_token(self, bytes_per_element: float = 4) -> float:
        """What the KV cache would hold per token if latent attention cached its up-projected keys and values
        (layers x heads x (qk_nope + qk_rope + v_head_dim)), as multi-head attention does; for any other
        attention the same as ``kv_bytes_per_token``."""
        if not self.is_mla:
            return self.kv_bytes_per_token(bytes_per_element)
        return self.num_layers * self.num_heads * (self.head_dim + self.v_head_dim) * bytes_per_element

    def num_parameters(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count of the model this config describes (tied embeddings counted once). ``active``:
        the parameters one token runs through, i.e. an MoE layer's router, its ``num_experts_per_tok``
        experts and its shared expert, not all ``num_experts`` (the same as the total for a dense model)."""
        h, f = self.hidden_size, self.intermediate_size
        if self.is_mla:
            attn = self._mla_parameters()
        else:
            attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
            if self.qkv_bias:
                attn += self.q_size + 2 * self.kv_size
        if self.attn_out_bias:
            attn += h
        if self.qk_norm_full:
            attn += self.q_size + self.kv_size
        mlp = (3 if self.gated_mlp else 2) * h * f
        if self.mlp_bias:
            mlp += (2 * f if self.gated_mlp else f) + h
        norm = h * (2 if self.norm_bias else 1)
        per_layer = attn + (4 if self.norm_placement == "sandwich" else 2) * norm
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        total = (norm if self.final_norm else 0) + (norm if self.embedding_norm else 0)
        for layer in range(self.num_layers):
            total += per_layer + (self._moe_parameters(active) if self.is_moe_layer(layer) else mlp)
        e = self.embedding_size
        if e != h:
            total += 2 * e * h  # project_in, project_out
        if include_embeddings:
            total += self.vocab_size * e
            if not self.tie_word_embeddings:
                total += self.vocab_size * e
            if self.position == "learned":
                total += (self.max_position_embeddings + self.position_offset) * h
        return total

    def _mla_parameters(self) -> int:
        """One latent attention's weights but the output bias: the query path (q_proj, or q_a_proj, its norm and
        q_b_proj), kv_a_proj [kv_lora_rank + rope, h], its norm, kv_b_proj [H (nope + v), kv_lora_rank] and o_proj."""
        h, heads, r, rq = self.hidden_size, self.num_heads, self.kv_lora_rank, self.q_lora_rank
        q = h * heads * self.head_dim if not rq else h * rq + rq + rq * heads * self.head_dim  # type: ignore[operator]
        kv = h * (r + self.qk_rope_head_dim) + r + r * heads * (self.qk_nope_head_dim + self.v_head_dim)
        bias = (rq if rq else 0) + r + self.qk_rope_head_dim if self.qkv_bias else 0  # q_a_proj, kv_a_proj
        return q + kv + bias + self.attn_out_size * h

    def _moe_parameters(self, active: bool) -> int:
        """One MoE layer's MLP: router [E, h] (and its score bias [E]), experts of 3 h f_moe each (k of them when
        ``active``), and the shared expert (3 h f_shared) with its gate [1, h] when gated."""
        h, experts = self.hidden_size, self.num_experts_per_tok if active else self.num_experts
        n = self.num_experts * h + experts * 3 * h * self.moe_intermediate_size  # type: ignore[operator]
        if self.moe_score_bias:
            n += self.num_experts
        if self.shared_expert_intermediate_size:
            n += 3 * h * self.shared_expert_intermediate_size + (h if self.shared_expert_gated else 0)
        return n

    # Serialization --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.sliding_window_layers is not None:
            d["sliding_window_layers"] = list(self.sliding_window_layers)
        if self.moe_layers is not None:
            d["moe_layers"] = list(self.moe_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], RopeScaling):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)



def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    if unit not in units or not number:
        raise ValueError(f"cannot read a size from {text!r} (examples: 2GiB, 512MiB, 1.5GB)")
    value = float(number) * units[unit]
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: blocks of ``block_size`` tokens, as many as the memory budget allows.

    The budget is ``memory_bytes`` if given, else ``memory_fraction`` of the memory available now;
    ``num_blocks`` overrides both (tests use it to force preemption).
    """

    block_size: int = 16
    memory_bytes: int | None = None
    memory_fraction: float = 0.1
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_dtype: str = "auto"  # "auto": the model's dtype; "int8": keys per channel, values per token (kv_quant.py)

    def __post_init__(self) -> None:
        if self.kv_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_dtype must be 'auto' or 'int8', got {self.kv_dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 < self.memory_fraction <= 0.9:
            raise ValueError(f"memory_fraction must be in (0, 0.9], got {self.memory_fraction}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching (Orca): what one engine step may hold.

    max_num_batched_tokens: tokens computed per step (decodes count one each; prefills are cut into
    chunks when chunked prefill is on). max_num_seqs: sequences running at once.
    preemption_mode: when blocks run out, the newest running sequence is preempted; "recompute"
    frees its blocks and prefills it again later (nothing generated is lost).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_chunked_prefill: bool = True
    preemption_mode: Literal["recompute"] = "recompute"
    max_model_len: int | None = None
    max_waiting: int | None = None  # refuse new requests beyond this many waiting (None: no limit)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.preemption_mode != "recompute":
            raise ValueError(f"unsupported preemption_mode {self.preemption_mode!r} (supported: recompute)")


KV_POLICIES = ("full", "window", "streaming", "h2o")


@dataclass(frozen=True)
class KVPolicyConfig:
    """Bounded KV memory per sequence (docs/ALGORITHMS.md, "KV eviction and streaming").

    A bounded sequence keeps at most ``budget`` tokens' keys and values in each layer; after every step
    the policy evicts down to the budget:

      "full"       keep everything (no policy: the plain paged cache).
      "window"     the last ``budget`` tokens (window-only attention).
      "streaming"  StreamingLLM (Xiao et al. 2309.17453): the first ``sink_tokens`` tokens (attention
                   sinks) plus the last ``budget - sink_tokens``.
      "h2o"        H2O (Zhang et al. 2306.14048): per layer and KV head, the last ``recent`` tokens plus
                   the older ones that received the most attention so far (the heavy hitters), where
                   recent = round(budget * ``recent_fraction``).

    Keys are cached before RoPE and rotated by their rank in the cache (positions 0..n-1, the query at
    n-1), so a sequence can run far past the model's trained context with positions it knows. A prompt
    is computed ``prefill_chunk`` tokens per step (each chunk attends to the kept tokens and causally to
    itself), so a sequence holds at most ``budget + prefill_chunk`` tokens' slots, whatever its length.
    """

    kind: str = "full"
    budget: int | None = None  # tokens kept per layer (required unless kind is "full")
    sink_tokens: int = 4  # streaming
    recent_fraction: float = 0.5  # h2o: the share of the budget kept for the most recent tokens
    prefill_chunk: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KV_POLICIES:
            raise ValueError(f"kv policy must be one of {KV_POLICIES}, got {self.kind!r}")
        if self.kind == "full":
            return
        if self.budget is None or self.budget < 2:
            raise ValueError(f"kv policy {self.kind!r} needs a budget of at least 2 tokens, got {self.budget}")
        if self.kind == "streaming" and not 0 <= self.sink_tokens < self.budget:
            raise ValueError(f"sink_tokens must be in [0, budget = {self.budget}), got {self.sink_tokens}")
        if self.kind == "h2o" and not 0 < self.recent_fraction <= 1:
            raise ValueError(f"recent_fraction must be in (0, 1], got {self.recent_fraction}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {self.prefill_chunk}")

    @property
    def bounded(self) -> bool:
        return self.kind != "full"

    @property
    def sinks(self) -> int:
        """Tokens at the start that are never evicted."""
        return self.sink_tokens if self.kind == "streaming" else 0

    @property
    def recent(self) -> int:
        """Most recent tokens that are never evicted (the rest of the budget is chosen by the policy)."""
        if self.kind == "h2o":
            return max(1, round(self.budget * self.recent_fraction))  # type: ignore[operator]
        return self.budget - self.sinks  # type: ignore[operator]

    @property
    def capacity(self) -> int:
        """Slots a bounded sequence can need at once: the kept tokens plus one step's new ones."""
        return self.budget + self.prefill_chunk  # type: ignore[operator]


SPECULATIVE_METHODS = ("ngram", "draft", "window")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (Leviathan et al. 2211.17192; Chen et al. 2302.01318): a proposer drafts up
    to ``num_tokens`` tokens for each decoding sequence, the target scores all of them in one forward,
    and the rejection sampler keeps a prefix of them plus one token of its own, so the output follows
    the target's distribution exactly.

    method:
      "ngram"   prompt lookup: continue the latest earlier occurrence of the last n tokens
                (n from ``ngram_max`` down to ``ngram_min``); no extra model.
      "draft"   a separate model sharing the target's tokenizer (``draft_model``: a path, or a loaded
                Transformer), with its own paged KV cache; a quantized copy of the target works
                (``draft_weights="native"`` runs a GGUF's own 4-bit weights).
      "window"  self-drafting (seed 002): the target's own weights attending only to the first
                ``sink_tokens`` tokens (rounded up to whole KV blocks) and the last ``window`` tokens.
    """

    method: str
    num_tokens: int = 3  # 1 + 3 rows fill one tile of loom's int4 kernel: k = 4 verified slower here
    draft_model: Any = None
    draft_weights: str | None = None
    ngram_max: int = 3
    ngram_min: int = 1
    window: int = 64
    sink_tokens: int = 4

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {SPECULATIVE_METHODS}, got {self.method!r}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_tokens (speculative tokens per step) must be in [1, 16], got {self.num_tokens}")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("speculative method 'draft' needs a draft_model (a path or a loaded model)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.window < 1 or self.sink_tokens < 0:
            raise ValueError("window must be positive and sink_tokens non-negative")


LORA_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class LoraServingConfig:
    """Serving LoRA adapters per request (engine/adapters.py), unmerged: the base GEMM once per batch plus
    each row's adapter product (S-LoRA, Sheng et al. 2023; Punica, Chen et al. 2023).

    max_loras:     adapter slots: the most distinct adapters one step computes (vLLM's ``--max-loras``)
    max_lora_rank: the slots' rank; an adapter of higher rank is refused, lower ranks are zero-padded
    max_cpu_loras: adapters whose weights stay in host memory, least recently used dropped first and read
                   again from their folder when needed (None: as many as ``max_loras``)
    modules:       (name, PEFT folder) pairs registered at start (``loom serve --lora-modules name=DIR``)
    dtype:         A and B in the slots (vLLM's ``--lora-dtype``): "auto" is bfloat16 on a quantized base,
                   whose own rounding dwarfs bf16's on the adapter (QLoRA keeps its adapters in bf16 too)
                   and where the adapter's bytes per token count most, else the model's dtype (exact)
    """

    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    modules: tuple[tuple[str, str], ...] = ()
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be positive, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be positive, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        if self.dtype not in LORA_DTYPES:
            raise ValueError(f"lora dtype must be one of {', '.join(LORA_DTYPES)}, got {self.dtype!r}")
        names = [name for name, _ in self.modules]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be distinct, got {names}")

    @property
    def host_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


DECODE_STEPS = ("auto", "native", "scripted", "cuda_graph", "module")  # see engine/step/__init__.py
WEIGHTS = ("native", "fp32", "bf16", "int8")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism (Megatron-LM, Shoeybi et al. 1909.08053): the model's heads, MLP and vocabulary cut
    across ``tensor_parallel_size`` worker processes, one shard each (engine/parallel/).

    tensor_parallel_size: ranks (1: today's single-process engine, nothing distributed)
    timeout_s:            the collective timeout: a rank that dies or hangs longer fails the engine with a
                          WorkerLostError instead of hanging it (torch.distributed's process-group timeout)
    heartbeat_s:          an idle rank 0 checks its workers this often (a tiny all-reduce), so a dead worker
                          is noticed between requests and workers never wait past the timeout (None: timeout / 4)
    backend:              "gloo" or "nccl" (None: gloo on the CPU, nccl on CUDA)
    """

    tensor_parallel_size: int = 1
    timeout_s: float = 60.0
    heartbeat_s: float | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"the collective timeout must be positive, got {self.timeout_s}")
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError(f"heartbeat_s must be in (0, timeout_s = {self.timeout_s}), got {self.heartbeat_s}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.timeout_s / 4


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides how loom loads a model and serves it: ``LLM(config=...)`` (or its keyword
    options, which are these fields) and ``LLMEngine(model, tokenizer, config)`` take one, validated here
    and never changed afterwards (the engine derives what it needs with ``dataclasses.replace``).

    model:            a .gguf file or a Hugging Face folder; None: the default model (SmolLM2-135M-Instruct)
    weights:          "native" (quantized files run quantized), "fp32" or "bf16" (everything dense),
                      "int8" (bf16 with W8A8 decoder linears on the int8 matrix units, CPU);
                      None: native, or dense in ``dtype`` when only a dtype is given
    dtype:            the dense dtype (default: the device's, fp32 on the CPU and bf16 on CUDA)
    device:           "cpu" (default) or "cuda"
    attention_kernel: prefill attention: "sdpa", "flash", "split_kv" or "naive" (layers/kernels.py)
    num_threads:      torch threads (default: all cores)
    rope_scaling:     a RopeScaling replacing the file's, "none" switching it off, None as the file says
    decode_step:      "auto" (the fastest steps that take the model) or one of DECODE_STEPS
    cache, scheduler: the paged KV cache and continuous batching
    speculative:      speculative decoding, or None
    kv_policy:        bounded KV memory for every request that sets none of its own, or None
    lora:             a PEFT LoRA adapter folder merged into the weights at load (dense weights: without
                      ``weights`` or ``dtype`` it loads fp32 on the CPU, bf16 on CUDA)
    lora_serving:     adapters chosen per request, unmerged (any weights, quantized included), or None
    parallel:         tensor parallelism (ParallelConfig); ``tensor_parallel_size`` is a shorthand for its size
    memory_budget:    bytes of host memory for the weights, the KV cache and a draft model (an int, or a size
                      such as "300M" / "1.5G"); the decoder layers that do not fit stream from the model file
                      layer by layer (engine/budget.py, weights/streaming.py). None: everything in memory
    stream_buffers:   decoder layers built at once while streaming (2: double buffering, 3: triple)
    """

    model: str | None = None
    weights: str | None = None
    dtype: Any = None  # str or torch.dtype
    device: Any = None  # str or torch.device
    attention_kernel: str = "sdpa"
    num_threads: int | None = None
    rope_scaling: RopeScalingOverride = None
    decode_step: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None
    kv_policy: KVPolicyConfig | None = None
    lora: str | None = None
    lora_serving: LoraServingConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory_budget: int | str | None = None
    stream_buffers: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.parallel, ParallelConfig):
            raise TypeError(f"parallel must be a ParallelConfig, got {type(self.parallel).__name__}")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))  # frozen: normalized once
            if self.decode_step not in ("auto", "module"):
                raise ValueError(f"decode_step {self.decode_step!r} holds every layer's weights at once; under a "
                                 "memory budget decode batches run layer by layer through the module step "
                                 "(decode_step 'auto' or 'module')")
            if self.lora_serving is not None:
                raise ValueError("per-request LoRA adapters and a memory budget cannot be combined yet (the "
                                 "adapters hook the linears of layers that stream)")
        if self.stream_buffers < 2:
            raise ValueError(f"stream_buffers must be at least 2 (one layer computing, one being read), "
                             f"got {self.stream_buffers}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, got {self.decode_step!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        for name, kind in (("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise TypeError(f"speculative must be a SpeculativeConfig, got {type(self.speculative).__name__}")
        if self.kv_policy is not None and not isinstance(self.kv_policy, KVPolicyConfig):
            raise TypeError(f"kv_policy must be a KVPolicyConfig, got {type(self.kv_policy).__name__}")
        if self.lora_serving is not None and not isinstance(self.lora_serving, LoraServingConfig):
            raise TypeError(f"lora_serving must be a LoraServingConfig, got {type(self.lora_serving).__name__}")
        if self.lora_serving is not None and self.speculative is not None:
            raise ValueError("speculative decoding and per-request LoRA adapters cannot be combined yet (the "
                             "draft would have to run each row's adapter too)")

    @classmethod
    def of(cls, config: EngineConfig | None = None, **options: Any) -> EngineConfig:
        """``config`` (or the defaults) with ``options`` (field names) replaced; unknown names raise TypeError."""
        if "tensor_parallel_size" in options:  # the shorthand of parallel.tensor_parallel_size
            size = options.pop("tensor_parallel_size")
            base = options.get("parallel") or (config.parallel if config is not None else ParallelConfig())
            options["parallel"] = replace(base, tensor_parallel_size=size)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(names))}")
        return replace(config, **options) if config is not None else cls(**options)
