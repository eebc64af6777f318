"""Memory needed to run or train a model: weights, KV cache, activations, gradients, optimizer states.

Seed 003's accounting per parameter at fp32 with Adam: weights 4 + Adam (two states) 8 + gradients 4
+ activations and temporaries ~8 (its estimate) = 24 bytes, so 1B parameters load in 4 GB and train
in 24 GB; it scales every term with the dtype (fp16: 2 / 12 GB, int8: 1 / 6 GB). ``activations="seed"``
reproduces that; the default ``"analytic"`` counts activations from batch x context instead, because
they do not depend on the parameter count.

``mixed_precision`` is the usual way 16-bit training is done (Micikevicius et al. 2018; ZeRO's 16
bytes per parameter): 16-bit weights and gradients plus an fp32 master copy and fp32 optimizer states.

KV cache (seed 001; docs/ALGORITHMS.md, "KV cache and paged attention"): layers x kv_heads x head_dim x 2 (K and V) x bytes per element,
per token, times batch x context. Latent attention (DeepSeek-V2, layers/mla.py) caches layers x (kv_lora_rank +
qk_rope_head_dim) elements per token instead; ``kv_cache_mha`` is what the same model would cache as multi-head
attention (its up-projected keys and values), for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from loom.analysis.presets import dtype_bytes
from loom.config import ModelConfig

Optimizer = Literal["adam", "adamw", "sgd", "sgd-momentum"]
OPTIMIZER_STATES: dict[str, int] = {"adam": 2, "adamw": 2, "sgd": 0, "sgd-momentum": 1}  # tensors per parameter

SEED_ACTIVATION_BYTES_PER_PARAM_FP32 = 8.0  # seed 003: "激活值和临时函数变量（可变大小） 8（预估）"


def activation_elements_per_token(config: ModelConfig, train: bool) -> float:
    """Activation elements one token holds.

    Training (kept for the backward pass, no recomputation, attention scores not stored, as with a
    fused / flash kernel): per layer the inputs of both norms (2d), of the q/k/v and gate/up
    projections (2d), q, k and v (q + 2 kv), the attention output (q), gate and up (2 n_ff) and the
    down projection's input (n_ff); plus the final norm's input (d) and the logits (vocab). Compare
    Korthikanti et al. 2022 (2205.05198), who count the same tensors for GPT in bytes.

    Inference: the widest point of one layer while the token is in flight: residual + normed input +
    q, k, v + attention output (attention), or residual + normed input + gate, up + their product (FFN).
    """
    c = config
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    ffn_width = 3 * f if c.gated_mlp else 2 * f
    if train:
        per_layer = 4 * d + 2 * q + 2 * kv + ffn_width
        return c.num_layers * per_layer + d + c.vocab_size
    return max(2 * d + 2 * q + 2 * kv, 2 * d + ffn_width)


@dataclass
class MemoryEstimate:
    """Bytes by component; ``total`` is their sum."""

    parameters: float
    dtype: str
    weights: float
    kv_cache: float
    activations: float
    gradients: float
    optimizer_states: float
    master_weights: float
    train: bool
    optimizer: str | None
    context: int
    batch: int
    activations_method: str
    # KV cache bytes per token, and what they would be were the model's attention multi-head (the same unless it
    # is latent attention); 0 without a model or when training
    kv_per_token: float = 0.0
    kv_per_token_mha: float = 0.0

    @property
    def kv_cache_mha(self) -> float:
        """The KV cache were the model's attention multi-head (``kv_cache`` unless it is latent attention)."""
        return self.batch * self.context * self.kv_per_token_mha

    @property
    def total(self) -> float:
        return (self.weights + self.kv_cache + self.activations + self.gradients + self.optimizer_states
                + self.master_weights)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kv_cache_mha": self.kv_cache_mha, "total": self.total}


def estimate_memory(config: ModelConfig | None = None, *, parameters: float | None = None, dtype: str = "fp16",
                    context: int = 0, batch: int = 1, train: bool = False, optimizer: Optimizer = "adam",
                    kv_dtype: str | None = None, activations: Literal["analytic", "seed"] = "analytic",
                    mixed_precision: bool = False) -> MemoryEstimate:
    """Memory to hold (``train=False``: weights + KV cache + transient activations) or train a model.

    ``dtype`` is the weights'; with int8 / int4 weights the activations and (unless ``kv_dtype`` says
    otherwise) the KV cache are counted in 16 bits. Seed 003's rule (``activations="seed"``) scales
    everything with ``dtype``, as the seed does.

    Give ``config`` (parameters counted from it, KV cache and activations from batch x context) or
    only ``parameters`` (seed 003's table: weights, gradients, optimizer states, and activations by the
    seed's per-parameter rule).
    """
    if config is None and parameters is None:
        raise ValueError("give a model or a parameter count")
    if context < 0 or batch < 1:
        raise ValueError("context must be >= 0 and batch >= 1")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    if activations not in ("analytic", "seed"):
        raise ValueError("activations must be 'analytic' or 'seed'")
    if config is None and activations == "analytic" and context:
        raise ValueError("analytic activations need a model (use activations='seed' with a bare parameter count)")
    params = float(config.num_parameters() if parameters is None else parameters)
    b = dtype_bytes(dtype)
    # Integer dtypes quantize the weights; activations (and, unless told, the KV cache) stay 16-bit.
    act_b = b if dtype in ("fp32", "fp16", "bf16") else 2.0
    weights = params * b
    kv = per_token = per_token_mha = 0.0
    if config is not None and not train:
        kv_b = dtype_bytes(kv_dtype) if kv_dtype else act_b
        per_token, per_token_mha = config.kv_bytes_per_token(kv_b), config.mha_kv_bytes_per_token(kv_b)
        kv = batch * context * per_token
    if activations == "seed":
        # Seed 003 counts activations per parameter; for inference it lists only the weights ("load").
        act = params * SEED_ACTIVATION_BYTES_PER_PARAM_FP32 * b / 4 if train else 0.0
    else:
        act = batch * context * activation_elements_per_token(config, train) * act_b if config is not None else 0.0
    grads = states = master = 0.0
    if train:
        grads = params * b
        state_bytes = 4.0 if mixed_precision else b
        states = params * OPTIMIZER_STATES[optimizer] * state_bytes
        if mixed_precision and b < 4:
            master = params * 4.0
    return MemoryEstimate(params, dtype, weights, kv, act, grads, states, master, train,
                          optimizer if train else None, context, batch, activations, per_token, per_token_mha)
