"""Decode steps: the ways loom runs one new token for each sequence of a batch, and how one is chosen.

    step          where it runs                      what it takes
    native        C++, one OpenMP region per step    Llama- or Gemma-3-shaped fp32 CPU models with dense or loom
                  (native.py, native/decode_step.cpp) int4/int8 linears; batches of <= 32 (quantized) or 1 (dense)
    scripted      TorchScript program (scripted.py)  Llama-shaped fp32 or bf16 CPU models, any weight-only linear,
                                                     any batch (bf16: oneDNN-packed weights, AMX GEMMs);
                                                     MoE layers too (Mixtral, Qwen2-MoE shapes); fp or int8 KV
                                                     caches (the only compiled step that reads int8 ones)
    cuda_graph    CUDA graph replay (cuda_graph.py)  pre-norm models without ALiBi on a GPU
    module        the nn.Module forward (module.py)  everything (and every prefill)

The runner builds the steps that take the model (``build_decode_steps``) and hands each decode
batch to the first that supports it; batches that prefill always run the module forward. Which
steps were built is logged once and reported by ``LLMEngine.describe()`` and the benchmarks.
"""

from __future__ import annotations

import torch

from loom.config import DECODE_STEPS
from loom.engine.step.base import DecodeBatch, DecodeStep, pad_tables
from loom.engine.step.module import ModuleStep
from loom.engine.step.native import NativeStep, native_problem
from loom.engine.step.scripted import ScriptedStep
from loom.engine.step.weights import DecoderWeights, decoder_shaped, llama_shaped, tensor_parallel
from loom.layers.multi_lora import LayerLora, LoraHooks
from loom.models.transformer import KVCaches, Transformer


__all__ = ["DECODE_STEPS", "DecodeBatch", "DecodeStep", "DecoderWeights", "ModuleStep", "NativeStep", "ScriptedStep",
           "build_decode_steps", "llama_shaped", "pad_tables"]


def build_decode_steps(model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, caches: KVCaches,
                       choice: str = "auto", pack_rows: int = 0, lora: list[LayerLora] | None = None,
                       lora_hooks: LoraHooks | None = None,
                       kv_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list[DecodeStep]:
    """The decode steps for ``model``, in order of preference, the module step last.

    ``choice``: "auto" builds every step that takes the model (native, then scripted on a CPU; CUDA
    graphs on a GPU); a step's name builds only that one (a ValueError says why when it cannot take
    the model); "module" none. ``k_cache``/``v_cache``: the cache tensors [layers, blocks, block,
    kv_heads, head_dim]; ``kv_scales``: an int8 cache's scales (engine/kv_cache.py: k_scale, v_scale,
    v_zero), which only the scripted and module steps read. ``pack_rows``: the
    decode batch the scripted step pre-packs dense weights for (the engine's max_num_seqs). ``lora`` and
    ``lora_hooks``: the adapter slots the compiled steps read, and the module path's hooks (engine/adapters.py);
    steps that cannot add adapter products pass batches with ``lora_slots`` on to the next."""
    if choice not in DECODE_STEPS:
        raise ValueError(f"unknown decode step {choice!r}; choose one of {', '.join(DECODE_STEPS)}")
    steps: list[DecodeStep] = []
    wanted = ("native", "scripted", "cuda_graph") if choice == "auto" else (choice,)
    if choice != "module":
        problems = {}
        for name in wanted:
            problem = _problem(name, model, kv_scales is not None)
            if problem is None:
                steps.append(_build(name, model, k_cache, v_cache, pack_rows, steps, lora, kv_scales))
            else:
                problems[name] = problem
        if choice != "auto" and problems:
            raise ValueError(f"the {choice} decode step cannot run this model: {problems[choice]}")
    steps.append(ModuleStep(model, caches, lora_hooks))
    return steps


def _problem(name: str, model: Transformer, int8_cache: bool) -> str | None:
    """Why step ``name`` cannot take the model and cache (None: it can)."""
    if tensor_parallel(model):
        return "a tensor-parallel shard decodes through engine/parallel/ (the scripted step with its group)"
    if int8_cache and name != "scripted":
        return "it reads fp KV caches; the int8 cache decodes through the scripted step or the modules"
    if name == "cuda_graph":
        from loom.engine.step.cuda_graph import CudaGraphStep

        return None if CudaGraphStep.takes(model) else "it needs a pre-norm model without ALiBi on a CUDA device"
    if name == "native":
        if not decoder_shaped(model):
            return ("it needs a Llama- or Gemma-shaped fp32 CPU model with weight-only linears "
                    "(weights.py: decoder_shaped)")
        return native_problem(DecoderWeights.of(model))
    if not llama_shaped(model):
        return "it needs a Llama-shaped fp32 or bf16 CPU model with weight-only linears (weights.py: llama_shaped)"
    return None


def _build(name: str, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, pack_rows: int,
           built: list[DecodeStep], lora: list[LayerLora] | None,
           kv_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> DecodeStep:
    if name == "cuda_graph":
        from loom.engine.step.cuda_graph import CudaGraphStep

        return CudaGraphStep(model, k_cache, v_cache)
    # The native and scripted steps share one gathering of the plain weights.
    weights = next((s.plain_weights for s in built if isinstance(s, NativeStep)), None) or DecoderWeights.of(model)
    if name == "native":
        return NativeStep(model, k_cache, v_cache, weights, lora=lora)
    return ScriptedStep(model, k_cache, v_cache, pack_rows, weights, lora=lora, kv_scales=kv_scales)
