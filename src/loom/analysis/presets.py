"""Presets for the analysis commands: models (as ``ModelConfig``) and hardware (bandwidth, peak FLOP/s).

Model presets are the published architectures; ``resolve_model`` also reads any model path loom can
load (a GGUF file or a Hugging Face folder) without loading its tensors.

Hardware figures are the vendors' dense (no sparsity) peaks. ``rtx4060-seed002`` keeps the figures
seed 002 reasons with (15.39 TFLOP/s, 768 GB/s); the real RTX 4060 has a 128-bit GDDR6 bus at
17 Gbps, i.e. 272 GB/s, and 15.11 TFLOP/s at its reference boost clock (``rtx4060``). The seed's
conclusion (decode is memory-bound) holds for both: the ridge moves from 20 to 56 FLOP/byte.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from loom.config import ModelConfig, RopeScaling

# Bytes per element of the dtypes the analysis commands accept.
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def dtype_bytes(dtype: str) -> float:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class Hardware:
    """A roofline: memory bandwidth (bytes/s) and peak FLOP/s per compute dtype.

    The ridge point (FLOP per byte) is peak / bandwidth: operators with a lower arithmetic intensity
    are memory-bound (Williams, Waterman, Patterson 2009, "Roofline").
    """

    name: str
    bandwidth: float  # bytes per second
    peak_flops: dict[str, float]  # FLOP/s by compute dtype ("fp32", "fp16", "bf16", "int8")
    memory_bytes: float | None = None
    note: str = ""

    def flops(self, dtype: str = "fp32") -> float:
        """Peak FLOP/s for ``dtype``; fp16 and bf16 stand in for each other, anything else falls back to fp32."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        twin = {"fp16": "bf16", "bf16": "fp16"}.get(dtype)
        if twin in self.peak_flops:
            return self.peak_flops[twin]
        if "fp32" in self.peak_flops:
            return self.peak_flops["fp32"]
        return max(self.peak_flops.values())

    def ridge(self, dtype: str = "fp32") -> float:
        """Arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof."""
        return self.flops(dtype) / self.bandwidth

    def attainable(self, intensity: float, dtype: str = "fp32") -> float:
        """The roofline: min(peak, intensity x bandwidth) FLOP/s."""
        return min(self.flops(dtype), intensity * self.bandwidth)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "bandwidth_Bps": self.bandwidth, "peak_flops": dict(self.peak_flops),
                "memory_bytes": self.memory_bytes, "note": self.note}


T = 1e12
HARDWARE: dict[str, Hardware] = {
    "rtx4060-seed002": Hardware("RTX 4060 (seed 002's figures)", 768e9, {"fp32": 15.39 * T, "fp16": 15.39 * T},
                                8 * 2**30, "seed 002: 15.39 TFLOPs, GDDR6 ~768 GBps (the bandwidth is not a "
                                "4060's: see rtx4060)"),
    "rtx4060": Hardware("RTX 4060", 272e9, {"fp32": 15.11 * T, "fp16": 15.11 * T}, 8 * 2**30,
                        "3072 CUDA cores x 2 x 2.46 GHz; 128-bit GDDR6 at 17 Gbps = 272 GB/s"),
    "a100": Hardware("A100 80GB SXM", 2039e9, {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T,
                                                "bf16": 312 * T, "int8": 624 * T}, 80e9,
                     "dense tensor-core peaks; HBM2e 2039 GB/s"),
    "a100-40gb": Hardware("A100 40GB SXM", 1555e9, {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T,
                                                     "bf16": 312 * T, "int8": 624 * T}, 40e9,
                          "dense tensor-core peaks; HBM2 1555 GB/s"),
    "h100": Hardware("H100 SXM", 3.35e12, {"fp32": 66.9 * T, "tf32": 494.7 * T, "fp16": 989.4 * T,
                                            "bf16": 989.4 * T, "int8": 1978.9 * T}, 80e9,
                     "dense tensor-core peaks; HBM3 3.35 TB/s"),
    "h100-pcie": Hardware("H100 PCIe", 2.0e12, {"fp32": 51.2 * T, "tf32": 378 * T, "fp16": 756.5 * T,
                                                 "bf16": 756.5 * T, "int8": 1513 * T}, 80e9,
                          "dense tensor-core peaks; HBM2e 2.0 TB/s"),
}

THIS_MACHINE = ("this", "probe")  # --hardware names that measure the machine the command runs on


def get_hardware(name: str) -> Hardware:
    """A hardware preset by name (see ``HARDWARE``); "this" / "probe" measure the current machine."""
    key = name.lower()
    if key in THIS_MACHINE:
        from loom.analysis.probe import probe

        return probe().hardware()
    try:
        return HARDWARE[key]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join([*HARDWARE, 'this'])}") from None


def custom_hardware(bandwidth_gbps: float, tflops: float, name: str = "custom") -> Hardware:
    """A roofline from ``--bandwidth GBPS --flops TFLOPS`` (the peak applies to every dtype)."""
    if bandwidth_gbps <= 0 or tflops <= 0:
        raise ValueError("--bandwidth and --flops must be positive")
    return Hardware(name, bandwidth_gbps * 1e9, {"fp32": tflops * T, "fp16": tflops * T, "bf16": tflops * T,
                                                  "int8": tflops * T})


MODELS: dict[str, ModelConfig] = {
    # Touvron et al. 2023 (Llama 2): MHA, SwiGLU FFN 11008, 4k context.
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                              intermediate_size=11008, rope_theta=10000.0, max_position_embeddings=4096,
                              norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,), name="llama-2-7b"),
    # Llama 3 8B: GQA with 8 KV heads, SwiGLU FFN 14336, 128k vocabulary, 8k context.
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                              intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192,
                              norm_eps=1e-5, bos_token_id=128000, eos_token_ids=(128001, 128009),
                              name="llama-3-8b"),
    # loom's default model (docs/ALGORITHMS.md, "The model we test on").
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=8192,
                                norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                                name="smollm2-135m"),
    # DeepSeek-V2-Lite (2405.04434; its published config.json): latent attention (kv_lora_rank 512, rope 64, no
    # q_lora_rank), 64 routed experts of 1408 (top 6) and 2 shared after one dense layer; YaRN x40 with
    # mscale = mscale_all_dim = 0.707 (cos/sin factor 1, softmax scale 192^-1/2 x mscale(40, 0.707)^2). 15.7B
    # parameters, 2.7B active; KV cache 576 values per token and layer, against 16 x (192 + 128) as MHA.
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16, intermediate_size=10944, norm_eps=1e-6,
        rope_scaling=RopeScaling("yarn", 40.0, 4096, attention_factor=1.0), max_position_embeddings=163840,
        attn_scale=192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, num_experts=64, num_experts_per_tok=6,
        moe_intermediate_size=1408, norm_topk_prob=False, shared_expert_intermediate_size=2 * 1408,
        shared_expert_gated=False, moe_layers=(False,) + (True,) * 26, bos_token_id=100000, eos_token_ids=(100001,),
        architecture="deepseek_v2", name="deepseek-v2-lite"),
}


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a GGUF file or a Hugging Face folder, without reading its tensors."""
    if os.path.isdir(path):
        from loom.weights.hf import read_hf_config

        return read_hf_config(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    from loom.weights.gguf import GGUFFile, config_from_gguf

    g = GGUFFile(path)
    try:
        return config_from_gguf(g)
    finally:
        g.close()


def resolve_model(spec: str | None) -> ModelConfig:
    """A model preset name, a model path, or None (loom's default model, SmolLM2-135M)."""
    if spec is None:
        return MODELS["smollm2-135m"]
    if spec.lower() in MODELS:
        return MODELS[spec.lower()]
    if os.path.exists(spec) or os.sep in spec or spec.endswith(".gguf"):
        return read_model_config(spec)
    raise ValueError(f"unknown model {spec!r}: a preset ({', '.join(MODELS)}) or a .gguf file / HF folder")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the three kinds of tensor an operator touches."""

    weight: float = 2.0
    kv: float = 2.0
    act: float = 2.0
    compute: str = "fp16"  # the dtype whose peak FLOP/s applies
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, dtype: str, weight_dtype: str | None = None, kv_dtype: str | None = None) -> Precision:
        """Activations (and the compute peak) in ``dtype``; weights and KV default to it too."""
        if dtype in ("int8", "int4"):
            raise ValueError(f"--dtype is the compute / activation dtype (fp32, fp16, bf16); use --weight-dtype "
                             f"{dtype} for quantized weights")
        w, kv = weight_dtype or dtype, kv_dtype or dtype
        return cls(dtype_bytes(w), dtype_bytes(kv), dtype_bytes(dtype), dtype, {"weight": w, "kv": kv, "act": dtype})

    def bytes_of(self, kind: str) -> float:
        return {"weight": self.weight, "kv": self.kv, "act": self.act}[kind]


@dataclass(frozen=True)
class Link:
    """An interconnect in the alpha-beta model (Hockney 1994): sending m bytes one hop costs
    alpha + m / beta. ``bandwidth`` (beta) is what one rank sends one way, bytes/s; ``latency`` (alpha)
    is one step's fixed cost, seconds (wire and switch latency, synchronization, the kernel or
    syscall that moves it)."""

    name: str
    bandwidth: float
    latency: float
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "bandwidth_Bps": self.bandwidth, "latency_s": self.latency, "note": self.note}


# Bandwidths are the standards' per-direction rates (PCIe: what x16 reaches after encoding and packet
# overhead); latencies are orders of magnitude per hop, stated as assumptions (override with
# --bandwidth-gbps / --alpha-us). "loopback" is this machine's gloo over 127.0.0.1 between 2 processes,
# fitted by `loom analyze parallel --measure` (docs/ANALYSIS.md, "Parallelism"); rerun it to refresh.
LINKS: dict[str, Link] = {
    "nvlink": Link("NVLink 3 (A100 SXM)", 300e9, 2e-6, "12 links x 25 GB/s per direction; ~2 us per hop assumed"),
    "pcie": Link("PCIe 4.0 x16", 24e9, 5e-6, "32 GB/s raw, ~24 GB/s achieved per direction; ~5 us per hop "
                                             "through the host bridge assumed"),
    "100gbe": Link("100 GbE (RDMA)", 12.5e9, 5e-6, "12.5 GB/s line rate; ~5 us per hop with RoCE assumed"),
    "25gbe": Link("25 GbE (TCP)", 3.125e9, 20e-6, "3.125 GB/s line rate; ~20 us per hop through kernel TCP "
                                                "assumed"),
    "loopback": Link("this machine's loopback (gloo, 2 processes)", 3.3e9, 44e-6,
                     "the median of 5 fits (alpha 39-58 us, beta 3.1-3.8 GB/s) of gloo all-reduces of 256 B to "
                     "1 MiB between 2 processes on 127.0.0.1, 2 shared cores"),
}


def get_link(name: str) -> Link:
    try:
        return LINKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; choose one of {', '.join(LINKS)}") from None
