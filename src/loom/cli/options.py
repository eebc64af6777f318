"""Option groups shared by several `loom` commands, and what their parsed values become.

Each ``add_*`` function adds one group of options to a command's parser; the functions below them
read those options back into loom's config objects. ``engine_config`` is the one mapping from parsed
options to the ``EngineConfig`` an LLM is built from, and ``llm_from_args`` the one way a command builds its LLM
(generate, chat, serve); the bench, eval and analyze runners build theirs in the lab from the config
objects they take.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from loom.config import (DECODE_STEPS, LORA_DTYPES, CacheConfig, EngineConfig, KVPolicyConfig, LoraServingConfig,
                         ParallelConfig, RopeScalingOverride, SchedulerConfig, SpeculativeConfig, parse_bytes, parse_rope_scaling)
from loom.llm import LLM
from loom.sampling_params import SamplingParams

WEIGHTS = ["native", "fp32", "bf16", "int8"]


# option groups -------------------------------------------------------------------------------------

def add_source_options(p: argparse.ArgumentParser) -> None:
    """--model and --threads: which model, on how many torch threads."""
    p.add_argument("--model", default=None, help="a .gguf file or a HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model, how its weights are held (--weights, --dtype) and its RoPE scaling."""
    add_source_options(p)
    p.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="native: quantized weights run quantized (the default for quantized files); "
                        "fp32 / bf16: everything dense in that dtype; int8: bf16 with W8A8 decoder linears "
                        "(rotated residual stream, int8 matrix units of the CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="run dense in this dtype (same as --weights fp32/bf16)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder, merged into the weights as they load (dense weights: "
                        "fp32 unless --weights / --dtype say otherwise)")
    add_rope_options(p)


def add_rope_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("RoPE scaling (overrides the file's)")
    r.add_argument("--rope-scaling", default=None, choices=["none", "linear", "ntk", "yarn"],
                   help="linear: position interpolation; ntk: NTK-aware base; yarn: YaRN; none: switch off the "
                        "file's scaling (default: as the file says)")
    r.add_argument("--rope-factor", type=float, default=None,
                   help="context extension factor s: the context becomes s x the original context")
    r.add_argument("--rope-original-context", type=int, default=None,
                   help="the context the model was trained with (default: the file's)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs (default cpu); on cuda the dense dtype defaults to bf16")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Two groups: the engine's KV cache and scheduler, and KV eviction (a bounded cache per sequence)."""
    e = p.add_argument_group("engine")
    e.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget, e.g. 2GiB (default: 10%% of free memory, the GPU's on cuda)")
    e.add_argument("--kv-cache-fraction", type=float, default=0.1, help="budget as a fraction of free memory")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-num-batched-tokens", type=int, default=1024)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--no-chunked-prefill", action="store_true")
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="int8: keys per channel (calibrated), values per token; 3.8x smaller than fp32")
    e.add_argument("--decode-step", default="auto", choices=DECODE_STEPS,
                   help="how decode batches run: auto (the fastest steps that take the model), native (C++), "
                        "scripted (TorchScript), cuda_graph, or module (the plain nn.Module forward)")
    e.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="host memory for the weights, KV cache and draft model, e.g. 300M or 1.5G: decoder layers "
                        "that do not fit stream from the model file layer by layer (default: all in memory)")
    e.add_argument("--stream-buffers", type=int, default=2,
                   help="with --memory-budget: layers built at once while streaming (2: double buffering)")
    t = p.add_argument_group("tensor parallelism (engine/parallel/)")
    t.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks the model is cut across: loom starts them on this machine, or run the same command "
                        "under torchrun (--nnodes M --nproc-per-node K, M x K ranks)")
    t.add_argument("--tp-timeout", type=float, default=ParallelConfig().timeout_s,
                   help="seconds a collective may wait for a rank before the engine fails (a dead or hung worker)")
    k = p.add_argument_group("KV eviction (bounded memory per sequence)")
    k.add_argument("--kv-policy", default="full", choices=["full", "window", "streaming", "h2o"],
                   help="window: the last --kv-budget tokens; streaming: --sink-tokens first tokens + a window "
                        "(StreamingLLM); h2o: a recent window + heavy hitters by accumulated attention")
    k.add_argument("--kv-budget", type=int, default=None, help="tokens kept per sequence and layer")
    k.add_argument("--sink-tokens", type=int, default=4, help="streaming: attention sinks kept")
    k.add_argument("--h2o-recent", type=float, default=0.5, help="h2o: share of the budget for recent tokens")
    k.add_argument("--kv-prefill-chunk", type=int, default=64, help="prompt tokens per step under a policy")


def add_speculative_options(p: argparse.ArgumentParser, several: bool = False) -> None:
    """Speculative decoding; ``several``: --speculative lists methods to compare (bench latency)."""
    s = p.add_argument_group("speculative decoding")
    if several:
        s.add_argument("--speculative", default=None, metavar="METHODS",
                       help="comma-separated methods to compare with plain decoding: ngram, draft, window")
    else:
        s.add_argument("--speculative", default=None, choices=["ngram", "draft", "window"],
                       help="ngram: prompt lookup; draft: a draft model (--draft-model); window: self-drafting "
                            "over attention sinks + a recent window")
    s.add_argument("--num-speculative-tokens", type=int, default=3, help="drafts per step (k)")
    s.add_argument("--draft-model", default=None, help="the draft model's file or folder (same tokenizer)")
    s.add_argument("--draft-weights", default=None, choices=WEIGHTS,
                   help="how to hold the draft's weights (default: native, e.g. a GGUF's own 4-bit weights)")
    s.add_argument("--spec-window", type=int, default=64, help="window: recent tokens the draft attends to")
    s.add_argument("--spec-sink-tokens", type=int, default=4, help="window: first tokens the draft keeps")


def lora_module(text: str) -> tuple[str, str]:
    """One ``--lora-modules`` entry: ``name=DIR``, or vLLM's JSON ``{"name": ..., "path": ...}``; an
    argparse error for anything else."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON: {e}") from None
        name, path = (entry.get("name"), entry.get("path")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise argparse.ArgumentTypeError(f"{text!r}: the JSON form needs a non-empty \"name\" and \"path\"")
        return name, path
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give an adapter as NAME=DIR (or JSON {{\"name\": ..., "
                                         "\"path\": ...}})")
    return name.strip(), path.strip()


def add_lora_serving_options(p: argparse.ArgumentParser) -> None:
    """LoRA adapters chosen per request (`loom serve`; vLLM's flags): each request's ``model`` names one."""
    defaults = LoraServingConfig()
    g = p.add_argument_group("LoRA adapters per request (a request's model names one)")
    g.add_argument("--lora-modules", nargs="+", action="extend", type=lora_module, default=None,
                   metavar="NAME=DIR",
                   help='PEFT LoRA adapter folders served unmerged, each as NAME=DIR or JSON {"name": ..., "path": '
                        '...}; a request with model NAME runs under that adapter')
    g.add_argument("--enable-lora", action="store_true",
                   help="serve adapters per request (implied by --lora-modules and --allow-runtime-lora)")
    g.add_argument("--max-loras", type=int, default=defaults.max_loras,
                   help="adapters one step can compute (slots; more are swapped in as slots free up)")
    g.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank,
                   help="the highest adapter rank accepted (adapters of higher rank are refused)")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory, the rest read again from their folders (default: --max-loras)")
    g.add_argument("--lora-dtype", default=defaults.dtype, choices=LORA_DTYPES,
                   help="the adapters' A and B in the slots: auto = bfloat16 on a quantized base (its own error "
                        "dwarfs bf16 rounding; half the bytes per token), the model's dtype on a dense one")
    g.add_argument("--allow-runtime-lora", action="store_true",
                   help="mount POST /v1/load_lora_adapter and /v1/unload_lora_adapter (a client then names "
                        "folders on this machine to load)")


def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    """The calibration text of quantize and prune."""
    p.add_argument("--calib", default="hamlet", help="calibration text: a named corpus or a file (never the eval text)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)


# what the options become ---------------------------------------------------------------------------

def rope_scaling(args: argparse.Namespace) -> RopeScalingOverride:
    return parse_rope_scaling(getattr(args, "rope_scaling", None), getattr(args, "rope_factor", None),
                              getattr(args, "rope_original_context", None))


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig | None:
    if not getattr(args, "speculative", None):
        return None
    return SpeculativeConfig(args.speculative, args.num_speculative_tokens, draft_model=args.draft_model,
                             draft_weights=args.draft_weights, window=args.spec_window,
                             sink_tokens=args.spec_sink_tokens)


def kv_policy(args: argparse.Namespace) -> KVPolicyConfig | None:
    if args.kv_policy == "full":
        return None
    return KVPolicyConfig(args.kv_policy, args.kv_budget, args.sink_tokens, args.h2o_recent, args.kv_prefill_chunk)


def cache_config(args: argparse.Namespace) -> CacheConfig:
    return CacheConfig(block_size=args.block_size, memory_fraction=args.kv_cache_fraction,
                       memory_bytes=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
                       enable_prefix_caching=not args.no_prefix_caching, kv_dtype=args.kv_cache_dtype)


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    """The scheduler; `loom serve`'s --max-waiting bounds its queue (other commands have no limit)."""
    return SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                           enable_chunked_prefill=not args.no_chunked_prefill, max_model_len=args.max_model_len,
                           max_waiting=getattr(args, "max_waiting", None))


def lora_serving_config(args: argparse.Namespace) -> LoraServingConfig | None:
    """Per-request adapters, when `loom serve` was given --lora-modules, --enable-lora or --allow-runtime-lora."""
    modules = getattr(args, "lora_modules", None) or []
    if not (modules or getattr(args, "enable_lora", False) or getattr(args, "allow_runtime_lora", False)):
        return None
    return LoraServingConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                             max_cpu_loras=args.max_cpu_loras, modules=tuple(modules),
                             dtype=getattr(args, "lora_dtype", "auto"))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the model, device, engine, speculative and RoPE options: the one place that maps
    parsed options onto the engine's configuration."""
    return EngineConfig(model=args.model, weights=args.weights, dtype=args.dtype, num_threads=args.threads,
                        device=args.device, rope_scaling=rope_scaling(args), decode_step=args.decode_step,
                        cache=cache_config(args), scheduler=scheduler_config(args),
                        speculative=speculative_config(args), kv_policy=kv_policy(args),
                        lora=getattr(args, "lora", None), lora_serving=lora_serving_config(args),
                        parallel=parallel_config(args),
                        memory_budget=parse_bytes(args.memory_budget) if getattr(args, "memory_budget", None) else None,
                        stream_buffers=getattr(args, "stream_buffers", 2))


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, timeout_s=args.tp_timeout)


def llm_from_args(args: argparse.Namespace) -> LLM:
    """The LLM a command runs, built from ``engine_config``; a clear error for an embedding-only encoder."""
    llm = LLM(config=engine_config(args))
    llm.generation_engine()
    return llm


def use_threads(args: argparse.Namespace) -> None:
    """Set torch's threads to --threads, if given (``llm_from_args`` passes them to LLM; commands whose
    runners load the model call this instead)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def fp32_model_from_args(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(path, the fp32 model, its tokenizer) of ``--model`` (default: the default model): what quantize and
    prune start from."""
    from loom.default_model import default_model_path
    from loom.tokenizer import load_tokenizer
    from loom.weights.loader import load_model

    use_threads(args)
    path = args.model or default_model_path()
    loaded = load_model(path, weights="fp32")
    return path, loaded.model, load_tokenizer(path, loaded.metadata, loaded.config.eos_token_ids)


def calibration_from_args(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Calibration samples [samples, seq_len] from ``--calib``, and how a checkpoint records them."""
    from loom.compress.calibration import CalibrationConfig, calibration_samples
    from loom.eval.corpora import corpus_path

    calib_file = corpus_path(args.calib)
    with open(calib_file, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    samples = calibration_samples(ids, CalibrationConfig(args.samples, args.seq_len, args.seed))
    return samples, {"text": calib_file, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed}
