"""The `loom` command: generate, chat, info, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from loom.analysis.cli import add_analyze_parser
from loom.compress.cli import add_prune_parser, add_quantize_parser
from loom.sampling_params import SamplingParams


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or a HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_source_args(p)
    p.add_argument("--weights", default=None, choices=["native", "fp32", "bf16"],
                   help="native: quantized weights run quantized (the default for quantized files); "
                        "fp32 / bf16: everything dense in that dtype")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="run dense in this dtype (same as --weights fp32/bf16)")
    _add_rope_args(p)


def _add_rope_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("RoPE scaling (overrides the file's)")
    r.add_argument("--rope-scaling", default=None, choices=["none", "linear", "ntk", "yarn"],
                   help="linear: position interpolation; ntk: NTK-aware base; yarn: YaRN; none: switch off the "
                        "file's scaling (default: as the file says)")
    r.add_argument("--rope-factor", type=float, default=None,
                   help="context extension factor s: the context becomes s x the original context")
    r.add_argument("--rope-original-context", type=int, default=None,
                   help="the context the model was trained with (default: the file's)")


def _rope_scaling(args: argparse.Namespace):
    from loom.config import parse_rope_scaling

    return parse_rope_scaling(getattr(args, "rope_scaling", None), getattr(args, "rope_factor", None),
                              getattr(args, "rope_original_context", None))


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs (default cpu); on cuda the dense dtype defaults to bf16")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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
    k = p.add_argument_group("KV eviction (bounded memory per sequence)")
    k.add_argument("--kv-policy", default="full", choices=["full", "window", "streaming", "h2o"],
                   help="window: the last --kv-budget tokens; streaming: --sink-tokens first tokens + a window "
                        "(StreamingLLM); h2o: a recent window + heavy hitters by accumulated attention")
    k.add_argument("--kv-budget", type=int, default=None, help="tokens kept per sequence and layer")
    k.add_argument("--sink-tokens", type=int, default=4, help="streaming: attention sinks kept")
    k.add_argument("--h2o-recent", type=float, default=0.5, help="h2o: share of the budget for recent tokens")
    k.add_argument("--kv-prefill-chunk", type=int, default=64, help="prompt tokens per step under a policy")


def _add_speculative_args(p: argparse.ArgumentParser, several: bool = False) -> None:
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
    s.add_argument("--draft-weights", default=None, choices=["native", "fp32", "bf16"],
                   help="how to hold the draft's weights (default: native, e.g. a GGUF's own 4-bit weights)")
    s.add_argument("--spec-window", type=int, default=64, help="window: recent tokens the draft attends to")
    s.add_argument("--spec-sink-tokens", type=int, default=4, help="window: first tokens the draft keeps")


def _speculative_config(args: argparse.Namespace):
    if not args.speculative:
        return None
    from loom.config import SpeculativeConfig

    return SpeculativeConfig(args.speculative, args.num_speculative_tokens, draft_model=args.draft_model,
                             draft_weights=args.draft_weights, window=args.spec_window,
                             sink_tokens=args.spec_sink_tokens)


def _kv_policy(args: argparse.Namespace):
    from loom.config import KVPolicyConfig

    if args.kv_policy == "full":
        return None
    return KVPolicyConfig(args.kv_policy, args.kv_budget, args.sink_tokens, args.h2o_recent, args.kv_prefill_chunk)


def _engine_configs(args: argparse.Namespace):
    from loom.config import CacheConfig, SchedulerConfig, parse_bytes

    cache = CacheConfig(block_size=args.block_size, memory_fraction=args.kv_cache_fraction,
                        memory_bytes=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
                        enable_prefix_caching=not args.no_prefix_caching, kv_dtype=args.kv_cache_dtype)
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            enable_chunked_prefill=not args.no_chunked_prefill, max_model_len=args.max_model_len)
    return cache, sched


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _load(args: argparse.Namespace):
    from loom.llm import LLM

    cache, sched = _engine_configs(args)
    llm = LLM(args.model, weights=args.weights, dtype=args.dtype, num_threads=args.threads, cache=cache,
              scheduler=sched, speculative=_speculative_config(args), device=args.device,
              kv_policy=_kv_policy(args),
              rope_scaling=_rope_scaling(args))
    if not getattr(args, "json", False):
        print(llm.engine.describe(), file=sys.stderr)
    return llm


def _use_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _emit(args: argparse.Namespace, result: dict[str, Any], plot: Any = None) -> bool:
    """Write the result to --out and its plot to --plot when asked; print it as JSON with --json.
    Returns whether it printed (the caller prints its summary otherwise)."""
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if plot is not None and getattr(args, "plot", None):
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    return bool(args.json)


def _merged(args: argparse.Namespace) -> dict[str, Any] | None:
    """The earlier result given with --merge, if any."""
    if not args.merge:
        return None
    with open(args.merge) as f:
        return json.load(f)


def _stats_line(t: Any, load_s: float | None = None) -> str:
    parts = [f"prompt {t.prompt_tokens} tokens in {t.prefill:.2f} s ({t.prefill_tokens_per_s:.0f} tok/s)",
             f"{t.generated_tokens} tokens, decode {t.decode_tokens_per_s:.1f} tok/s"]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    return "[" + " | ".join(parts) + "]"


def cmd_generate(args: argparse.Namespace) -> int:
    from loom.outputs import Timings

    llm = _load(args)
    params = _sampling(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = llm.encode_chat(messages)
    else:
        prompt_ids = llm.encode(args.prompt)
    timings = Timings()
    text, tokens, finish, reason = [], [], None, None
    for delta in llm.stream(prompt_ids, params, timings):
        if not args.json:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        text.append(delta.text)
        tokens.extend(delta.token_ids)
        finish, reason = delta.finish_reason, delta.stop_reason
    if args.json:
        print(json.dumps({"prompt": args.prompt, "prompt_token_ids": prompt_ids, "token_ids": tokens,
                          "text": "".join(text), "finish_reason": finish, "stop_reason": reason,
                          "timings": {**timings.to_dict(), "load_s": llm.load_seconds}}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(_stats_line(timings, llm.load_seconds), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from loom.outputs import Timings

    llm = _load(args)
    params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"loom chat: {llm.config.name or llm.model_path} (load {llm.load_seconds:.2f} s). "
          "/reset clears the conversation, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        timings, answer = Timings(), []
        try:
            for delta in llm.chat_stream(system + history, params, timings):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                answer.append(delta.text)
        except KeyboardInterrupt:
            pass  # stop this answer, keep the conversation
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        print(_stats_line(timings), file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(answer)})


def model_info(path: str | None) -> dict[str, Any]:
    import os
    from collections import Counter

    from loom.default_model import default_model_path
    from loom.weights.gguf import GGUFFile, config_from_gguf
    from loom.weights.hf import read_hf_config

    path = path or default_model_path()
    info: dict[str, Any] = {"path": path}
    if os.path.isdir(path):
        config = read_hf_config(path)
        info["format"] = "hf"
    else:
        g = GGUFFile(path)
        config = config_from_gguf(g)
        info["format"] = f"gguf v{g.version}"
        info["file_bytes"] = os.path.getsize(path)
        info["tensor_types"] = dict(Counter(t.qtype.name for t in g.tensors.values()))
        g.close()
    params = config.num_parameters()
    info["architecture"] = config.architecture
    info["name"] = config.name
    info["config"] = config.to_dict()
    info["parameters"] = params
    info["parameters_without_embeddings"] = config.num_parameters(include_embeddings=False)
    info["bytes_by_dtype"] = {k: int(params * b) for k, b in
                              (("fp32", 4), ("bf16", 2), ("fp16", 2), ("int8", 1), ("int4", 0.5))}
    info["kv_bytes_per_token"] = {"fp32": config.kv_bytes_per_token(4), "bf16": config.kv_bytes_per_token(2),
                                  "int8": config.kv_bytes_per_token(1)}
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model_path or args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    gib = 1 << 30
    print(f"{info['path']}")
    print(f"  format        {info['format']}" + (f", {info['file_bytes'] / 1e6:.1f} MB" if "file_bytes" in info else ""))
    if "tensor_types" in info:
        print("  tensor types  " + ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items())))
    print(f"  architecture  {info['architecture']} ({info['name']})")
    print(f"  layers {c['num_layers']}, hidden {c['hidden_size']}, FFN {c['intermediate_size']} "
          f"({'gated ' if c['gated_mlp'] else ''}{c['activation']}), heads {c['num_heads']} "
          f"(kv {c['num_kv_heads']}, head_dim {c['head_dim']}), vocab {c['vocab_size']}")
    print(f"  positions     {c['position']}" + (f" theta {c['rope_theta']:g}" if c["position"] == "rope" else "")
          + f", context {c['max_position_embeddings']}, norm {c['norm']} eps {c['norm_eps']:g}, "
          f"tied embeddings {c['tie_word_embeddings']}")
    if c.get("rope_scaling"):
        r = c["rope_scaling"]
        print(f"  rope scaling  {r['kind']} x{r['factor']:g} (trained context {r['original_max_position']})")
    print(f"  parameters    {info['parameters']:,} ({info['parameters_without_embeddings']:,} without embeddings)")
    print("  weight bytes  " + ", ".join(f"{k} {v / gib:.3f} GiB" for k, v in info["bytes_by_dtype"].items()))
    print("  KV per token  " + ", ".join(f"{k} {v:,.0f} B" for k, v in info["kv_bytes_per_token"].items()))
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from loom.bench.latency import run_latency

    _use_threads(args)
    if args.speculative:
        from loom.bench.speculative import run_speculative_latency

        result = run_speculative_latency(
            args.model, methods=[m for m in args.speculative.split(",") if m], num_tokens=args.num_speculative_tokens,
            draft_model=args.draft_model, draft_weights=args.draft_weights, weights=args.weights, dtype=args.dtype,
            gen_len=args.gen_len, repeats=args.repeats, temperature=args.temperature, window=args.spec_window,
            sink_tokens=args.spec_sink_tokens, prompts=[p for p in args.spec_prompts.split(",") if p],
            rope_scaling=_rope_scaling(args))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for prompt, row in result["results"].items():
                print(f"{prompt}: plain {row['plain']['decode_tokens_per_s']:.1f} tok/s")
                for m in result["methods"]:
                    r = row[m]
                    print(f"  {m:7s} {r['decode_tokens_per_s']:6.1f} tok/s  {r['speedup']:.2f}x  acceptance "
                          f"{r['acceptance_rate']:.2f}  tokens/pass {r['tokens_per_pass']:.2f} "
                          f"(formula {r['expected_tokens_per_pass']:.2f})")
        return 0
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    result = run_latency(args.model, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                         peers=peers, weights=args.weights, dtype=args.dtype,
                         repeats=args.repeats, device=args.device, rope_scaling=_rope_scaling(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in result["results"].items():
            print(f"{name:10s} prefill {r['prefill_tokens_per_s']:8.1f} tok/s   decode {r['decode_tokens_per_s']:6.1f} "
                  f"tok/s   {100 * r['fraction_of_limit']:.0f}% of the {r['bandwidth_limit_tokens_per_s']:.0f} tok/s "
                  f"bandwidth limit")
        for peer, ratio in (result["speedup"] or {}).items():
            print(f"loom / {peer}: decode {ratio['decode']:.2f}x, prefill {ratio['prefill']:.2f}x")
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from loom.bench.throughput import run_throughput

    _use_threads(args)
    cache, sched = _engine_configs(args)
    peers = tuple(p for p in args.peers.split(",") if p and p != "none")
    result = run_throughput(args.model, num_prompts=args.num_prompts, input_len=args.input_len,
                            output_len=args.output_len, peers=peers, weights=args.weights, dtype=args.dtype,
                            hf_batch=args.hf_batch,
                            cache=cache, scheduler=sched, repeats=args.repeats, device=args.device,
                            kv_policy=_kv_policy(args),
                            rope_scaling=_rope_scaling(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in result["results"].items():
            print(f"{name:5s} {r['requests_per_s']:6.2f} req/s  {r['output_tokens_per_s']:8.1f} output tok/s  "
                  f"{r['total_tokens_per_s']:8.1f} total tok/s  ({r['elapsed_s']:.1f} s)")
        loom = result["results"]["loom"]
        print(f"loom: peak {loom['peak_kv_blocks']} of {loom['kv_blocks_total']} KV blocks, "
              f"mean KV waste {100 * loom['kv_waste_mean']:.2f}%, {loom['preemptions']} preemptions")
        if result["loom_over_hf"]:
            print(f"loom / hf total throughput: {result['loom_over_hf']['total_tokens_per_s']:.2f}x")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from loom.bench.serve import run_serve_bench

    result = run_serve_bench(args.model, concurrency=args.concurrency, num_prompts=args.num_prompts,
                             input_len=args.input_len, output_len=args.output_len,
                             kv_cache_memory=args.kv_cache_memory, offline=not args.no_offline,
                             repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    h = result["results"]["http"]
    print(f"http     {h['requests_per_s']:6.2f} req/s  {h['output_tokens_per_s']:8.1f} output tok/s  "
          f"({h['completed']} ok, {h['failed']} failed, {h['elapsed_s']:.1f} s)")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        m = h[name]
        print(f"  {name[:-2]:5s} mean {1000 * m['mean']:8.1f} ms  p50 {1000 * m['p50']:8.1f} ms  "
              f"p99 {1000 * m['p99']:8.1f} ms")
    if "offline" in result["results"]:
        o = result["results"]["offline"]
        print(f"offline  {o['requests_per_s']:6.2f} req/s  {o['output_tokens_per_s']:8.1f} output tok/s; "
              f"http / offline = {result['http_over_offline']:.2f}")
    return 0


def cmd_bench_load(args: argparse.Namespace) -> int:
    from loom.bench.load import run_load

    peers = [p for p in args.peers.split(",") if p and p != "none"]
    result = run_load(args.model, peers=peers, repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in result["results"].items():
            if isinstance(r, dict):
                print(f"{name:5s} load {r['load_s']:.2f} s")
    return 0


def cmd_bench_kv_eviction(args: argparse.Namespace) -> int:
    from loom.bench.kv_eviction import plot_kv_eviction, run_kv_eviction

    _use_threads(args)
    result = run_kv_eviction(args.model, weights=args.weights, corpus=args.corpus, tokens=args.tokens,
                             budgets=[float(b) for b in args.budgets.split(",")], sink_tokens=args.sink_tokens,
                             bucket=args.bucket, chunk=args.chunk, rope_scaling=_rope_scaling(args),
                             progress=not args.json)
    if not _emit(args, result, plot_kv_eviction):
        for r in result["results"]:
            worst = max(b["perplexity"] for b in r["buckets"])
            print(f"{r['name']:<26} ppl {r['perplexity']:9.2f}   worst {result['bucket']}-token bucket {worst:9.2f}")
    return 0


def cmd_bench_streaming(args: argparse.Namespace) -> int:
    from loom.bench.kv_eviction import run_streaming

    _use_threads(args)
    result = run_streaming(args.model, weights=args.weights, prompt=args.prompt, generate=args.generate,
                           budget=args.budget, sink_tokens=args.sink_tokens, kind=args.kind, every=args.every,
                           rope_scaling=_rope_scaling(args), progress=not args.json)
    if not _emit(args, result):
        blocks = sorted({t["kv_blocks"] for t in result["trace"]})
        print(f"{result['policy']}: {result['generated']} tokens in {result['seconds']:.0f} s "
              f"({result['tokens_per_s']:.1f} tok/s); KV blocks held over the run: {blocks}; "
              f"{result['kv_bytes_held_at_end'] / 2**20:.1f} MiB at the end vs "
              f"{result['kv_bytes_a_full_cache_would_hold'] / 2**20:.1f} MiB for a full cache")
        if result["plain_tokens_per_s_at_budget"] and result["bounded_tokens_per_s_at_budget"]:
            print(f"decode once {args.budget} tokens are held: {result['bounded_tokens_per_s_at_budget']:.1f} tok/s "
                  f"bounded vs {result['plain_tokens_per_s_at_budget']:.1f} tok/s plain (full cache, same run)")
    return 0


def cmd_bench_quantization(args: argparse.Namespace) -> int:
    from loom.bench.quantization import plot_quantization, run_quantization_bench

    result = run_quantization_bench(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                                    calib=args.calib, samples=args.samples, seq_len=args.seq_len, only=args.only,
                                    progress=not args.json, merge=_merged(args),
                                    peers=[p for p in args.peers.split(",") if p and p != "none"],
                                    decode_only=args.decode_only)
    if not _emit(args, result, plot_quantization):
        for r in result["results"]:
            if "error" in r:
                print(f"{r['name']:<34} failed: {r['error']}")
                continue
            mb = f"{r['weight_bytes_per_token'] / 1e6:7.1f}" if r["weight_bytes_per_token"] else "      -"
            print(f"{r['name']:<34} ppl {r['perplexity']:8.3f}  {r['nominal_bits_per_weight']:5.2f} bpw  "
                  f"{mb} MB/token  {r['decode_tokens_per_s']:6.1f} tok/s")
    return 0


def cmd_bench_pruning(args: argparse.Namespace) -> int:
    from loom.bench.pruning import plot_pruning, run_pruning_bench

    result = run_pruning_bench(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                               calib=args.calib, samples=args.samples, seq_len=args.seq_len, only=args.only,
                               progress=not args.json, merge=_merged(args))
    if not _emit(args, result, plot_pruning):
        for r in result["results"]:
            print(f"{r['name']:<48} ppl {r['perplexity']:9.3f} ({100 * r['perplexity_vs_fp32']:+7.1f}%)  "
                  f"{100 * r['linear_sparsity']:5.1f}% zeros")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from loom.eval.perplexity import run_perplexity

    _use_threads(args)
    result = run_perplexity(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                            dtype=args.dtype, weights=args.weights, progress=not args.no_progress,
                            protocol=args.protocol, rope_scaling=_rope_scaling(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"perplexity {r['perplexity']:.3f} ({r['protocol']}) on {r['tokens_scored']:,} scored tokens "
              f"({r['windows']} windows of {r['window']}, {r['tokens_total']:,} tokens in {r['corpus_path']}); "
              f"{r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tok/s")
    return 0


def cmd_eval_context(args: argparse.Namespace) -> int:
    from loom.eval.context import format_table, plot_context, run_context

    _use_threads(args)
    methods = [m for m in args.methods.split(",") if m]
    result = run_context(args.model, methods=methods, factor=args.rope_factor,
                         original_context=args.rope_original_context, window=args.window, windows=args.windows,
                         bucket=args.bucket, corpus=args.corpus, weights=args.weights,
                         progress=not args.no_progress, out=args.out)
    if args.plot:
        plot_context(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"mean NLL (perplexity) by position, {result['windows']} windows of {result['window']} tokens "
              f"of {result['corpus']}, factor {result['factor']:g}, trained context {result['trained_context']}")
        print(format_table(result))
    return 0


def default_served_name(path: str) -> str:
    import os

    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from loom.serve.app import create_app
    from loom.serve.server import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache, sched = _engine_configs(args)
    sched.max_waiting = args.max_waiting
    from loom.llm import LLM

    llm = LLM(args.model, weights=args.weights, dtype=args.dtype, num_threads=args.threads, cache=cache,
              scheduler=sched, speculative=_speculative_config(args), device=args.device,
              kv_policy=_kv_policy(args),
              rope_scaling=_rope_scaling(args))
    name = args.served_model_name or default_served_name(llm.model_path)
    app = create_app(llm.engine, llm.tokenizer, name, api_key=args.api_key,
                     max_request_bytes=args.max_request_bytes)
    print(f"loom: serving {name!r} on http://{args.host}:{args.port} (load {llm.load_seconds:.2f} s; "
          f"{llm.engine.describe()})", file=sys.stderr)
    serve(app, args.host, args.port, args.log_level, args.graceful_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="A hackable LLM inference engine and efficiency lab.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming the text")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_device_arg(g)
    _add_engine_args(g)
    _add_speculative_args(g)
    _add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat, streaming")
    _add_model_args(c)
    _add_device_arg(c)
    _add_engine_args(c)
    _add_speculative_args(c)
    _add_sampling_args(c, max_tokens=512)
    c.add_argument("--system", default=None)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    _add_model_args(sv)
    _add_device_arg(sv)
    _add_engine_args(sv)
    _add_speculative_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: file name)")
    sv.add_argument("--max-waiting", type=int, default=256, help="requests waiting beyond this get 503")
    sv.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    sv.add_argument("--graceful-timeout", type=float, default=30.0,
                    help="seconds in-flight requests may finish after SIGTERM")
    sv.add_argument("--log-level", default="info")
    sv.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="architecture, parameters, bytes per dtype, KV bytes per token")
    i.add_argument("model_path", nargs="?", default=None)
    i.add_argument("--model", default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="measure loom against its peers")
    bsub = b.add_subparsers(dest="bench", required=True)
    lat = bsub.add_parser("latency", help="batch-1 prefill and decode tokens/s, and the fraction of the bandwidth limit")
    _add_model_args(lat)
    _add_device_arg(lat)
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--prompt-len", type=int, default=32)
    lat.add_argument("--gen-len", type=int, default=128)
    lat.add_argument("--peers", default="hf", help="comma-separated: hf (transformers), eager (loom without its "
                     "scripted decode step), or none")
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--temperature", type=float, default=0.0, help="with --speculative: 0 = greedy")
    _add_speculative_args(lat, several=True)
    lat.add_argument("--spec-prompts", default="copy,open,long", help="with --speculative: which prompts "
                     "(copy: rewrite a passage; open: a story; long: summarize ~3,000 tokens of Hamlet)")
    lat.add_argument("--json", action="store_true")
    lat.set_defaults(func=cmd_bench_latency)
    tp = bsub.add_parser("throughput", help="many requests at once: loom's engine vs HF static batching")
    _add_model_args(tp)
    _add_device_arg(tp)
    _add_engine_args(tp)
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--peers", default="hf", help="comma-separated: hf, or none")
    tp.add_argument("--hf-batch", type=int, default=8, help="HF static batch size")
    tp.add_argument("--repeats", type=int, default=1, help="alternating loom / HF runs; the best of each")
    tp.add_argument("--json", action="store_true")
    tp.set_defaults(func=cmd_bench_throughput)
    bs = bsub.add_parser("serve", help="load-test `loom serve` over HTTP (TTFT, TPOT, ITL, E2E) vs the offline engine")
    bs.add_argument("--model", default=None)
    bs.add_argument("--concurrency", type=int, default=16)
    bs.add_argument("--num-prompts", type=int, default=64)
    bs.add_argument("--input-len", type=int, default=128)
    bs.add_argument("--output-len", type=int, default=128)
    bs.add_argument("--kv-cache-memory", default="2GiB")
    bs.add_argument("--no-offline", action="store_true", help="skip the offline engine run")
    bs.add_argument("--repeats", type=int, default=2, help="alternating offline / http runs; the best of each")
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=cmd_bench_serve)
    ld = bsub.add_parser("load", help="seconds to load a model and its tokenizer, loom vs HF")
    ld.add_argument("--model", default=None)
    ld.add_argument("--peers", default="hf")
    ld.add_argument("--repeats", type=int, default=3)
    ld.add_argument("--json", action="store_true")
    ld.set_defaults(func=cmd_bench_load)

    ev = sub.add_parser("eval", help="model quality on a text")
    esub = ev.add_subparsers(dest="eval", required=True)
    pp = esub.add_parser("ppl", help="perplexity over non-overlapping windows (the GPTQ repository's protocol)")
    _add_model_args(pp)
    pp.add_argument("--corpus", default="britannica", help="a named corpus (britannica, hamlet) or a text file")
    pp.add_argument("--window", type=int, default=512, help="tokens per window, L (L - 1 scored per window)")
    pp.add_argument("--max-tokens", type=int, default=None, help="keep the corpus's first N tokens (default: all)")
    pp.add_argument("--protocol", default="gptq", choices=["gptq", "shifted"],
                    help="gptq: L-1 labels inside each window; shifted: labels run across window ends (n*L-1)")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_eval_ppl)
    cx = esub.add_parser("context", help="NLL by position past the trained context, with and without RoPE scaling")
    _add_source_args(cx)
    cx.add_argument("--weights", default="fp32", choices=["native", "fp32", "bf16"])
    cx.add_argument("--methods", default="none,linear,ntk,yarn",
                    help="comma-separated: none (plain RoPE), linear (PI), ntk, yarn")
    cx.add_argument("--rope-factor", type=float, default=2.0, help="scaling factor s of every method but none")
    cx.add_argument("--rope-original-context", type=int, default=None,
                    help="the trained context L0 the scaling starts from (default: the file's)")
    cx.add_argument("--corpus", default="britannica", help="a named corpus (britannica, hamlet) or a text file")
    cx.add_argument("--window", type=int, default=16384, help="tokens per window, scored from position 0")
    cx.add_argument("--windows", type=int, default=2, help="non-overlapping windows from the corpus start")
    cx.add_argument("--bucket", type=int, default=2048, help="positions per reported bucket")
    cx.add_argument("--out", default=None, help="write the JSON here (rewritten after each method)")
    cx.add_argument("--plot", default=None, help="write NLL per position bucket to this PNG")
    cx.add_argument("--no-progress", action="store_true", help="no progress bar")
    cx.add_argument("--json", action="store_true")
    cx.set_defaults(func=cmd_eval_context)

    add_analyze_parser(sub)
    add_quantize_parser(sub, _add_source_args)
    add_prune_parser(sub, _add_source_args)

    ke = bsub.add_parser("kv-eviction", help="perplexity by position under window / StreamingLLM / H2O KV budgets")
    _add_model_args(ke)
    ke.add_argument("--corpus", default="britannica")
    ke.add_argument("--tokens", type=int, default=2048, help="text length scored token by token")
    ke.add_argument("--budgets", default="0.1,0.2,0.5", help="KV budgets as fractions of --tokens")
    ke.add_argument("--sink-tokens", type=int, default=4)
    ke.add_argument("--bucket", type=int, default=256, help="positions per row of the table")
    ke.add_argument("--chunk", type=int, default=1,
                    help="tokens scored per step (1: every token sees exactly the policy's cache)")
    ke.add_argument("--out", default=None, help="write the JSON result here")
    ke.add_argument("--plot", default=None, help="write a PNG plot here")
    ke.add_argument("--json", action="store_true")
    ke.set_defaults(func=cmd_bench_kv_eviction)
    sg = bsub.add_parser("streaming", help="a generation far past the KV budget: memory held and speed")
    _add_model_args(sg)
    sg.add_argument("--prompt", default="The history of England")
    sg.add_argument("--generate", type=int, default=20000)
    sg.add_argument("--budget", type=int, default=1024)
    sg.add_argument("--kind", default="streaming", choices=["window", "streaming", "h2o"])
    sg.add_argument("--sink-tokens", type=int, default=4)
    sg.add_argument("--every", type=int, default=500, help="record the KV blocks held every N tokens")
    sg.add_argument("--out", default=None)
    sg.add_argument("--json", action="store_true")
    sg.set_defaults(func=cmd_bench_streaming)
    bq = bsub.add_parser("quantization", help="perplexity, bytes and decode tokens/s of every quantization method")
    bq.add_argument("--model", default=None)
    bq.add_argument("--corpus", default="britannica")
    bq.add_argument("--window", type=int, default=512)
    bq.add_argument("--max-tokens", type=int, default=20480, help="first N tokens of the corpus (default 20480)")
    bq.add_argument("--calib", default="hamlet")
    bq.add_argument("--samples", type=int, default=32)
    bq.add_argument("--seq-len", type=int, default=512)
    bq.add_argument("--only", nargs="*", default=[], help="methods or setting names to run (default: all)")
    bq.add_argument("--plot", default=None, help="write perplexity vs bits per weight to this PNG")
    bq.add_argument("--out", default=None, help="also write the JSON here")
    bq.add_argument("--merge", default=None, help="keep this earlier JSON's rows for settings not run now")
    bq.add_argument("--decode-only", action="store_true",
                    help="re-measure decode tok/s of an earlier run's checkpoints (give it with --merge)")
    bq.add_argument("--peers", default="none", help="comma-separated: torchao, quanto (int8 / int4 weight-only "
                    "on the HF model; `make peers` installs them)")
    bq.add_argument("--json", action="store_true")
    bq.set_defaults(func=cmd_bench_quantization)

    bp = bsub.add_parser("pruning", help="perplexity of magnitude, Wanda and SparseGPT at 50% and N:M sparsity")
    bp.add_argument("--model", default=None)
    bp.add_argument("--corpus", default="britannica")
    bp.add_argument("--window", type=int, default=512)
    bp.add_argument("--max-tokens", type=int, default=20480, help="first N tokens of the corpus (default 20480)")
    bp.add_argument("--calib", default="hamlet")
    bp.add_argument("--samples", type=int, default=32)
    bp.add_argument("--seq-len", type=int, default=512)
    bp.add_argument("--only", nargs="*", default=[], help="methods or setting names to run (default: all)")
    bp.add_argument("--plot", default=None, help="write the perplexity bars to this PNG")
    bp.add_argument("--out", default=None, help="also write the JSON here")
    bp.add_argument("--merge", default=None, help="keep this earlier JSON's rows for settings not run now")
    bp.add_argument("--json", action="store_true")
    bp.set_defaults(func=cmd_bench_pruning)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
