"""`loom analyze ...`: the lab's calculators, printed as tables or JSON (--json): per-operator roofline
and arithmetic intensity, memory needs of inference and training, the speed limit of offloading, the
speedup of speculative decoding, this machine's measured roofs, a roofline plot, and SpAtten prompt
pruning. The calculations live in loom.analysis."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from loom.analysis.presets import (HARDWARE, MODELS, THIS_MACHINE, DTYPE_BYTES, Hardware, Precision,
                                   custom_hardware, get_hardware, resolve_model)
from loom.analysis.report import binary, seconds, si, table
from loom.cli.options import WEIGHTS, use_threads
from loom.cli.output import print_json
from loom.cli.subcommands import Subcommand, register_subcommands

_MODELS = ", ".join(MODELS)


def _print_json(obj: Any) -> None:
    print_json(obj, default=str)  # anything a report holds that JSON cannot, as text


def _parse_bytes(text: str) -> float:
    """'7.7GB', '3.5GiB', '4GB/s', '0', '7e9' -> bytes (or bytes per second)."""
    s = text.strip().replace(" ", "")
    if s.lower().endswith("/s"):
        s = s[:-2]
    try:
        return float(s)
    except ValueError:
        from loom.config import parse_bytes

        return float(parse_bytes(s))


def _parse_count(text: str) -> float:
    """'1B', '135M', '7e9', '1.5T' -> a parameter count."""
    s = text.strip().replace(" ", "").upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(s[-1:], 1.0)
    try:
        value = float(s[:-1] if scale != 1.0 else s) * scale
    except ValueError:
        raise ValueError(f"cannot read a parameter count from {text!r} (examples: 1B, 135M, 7e9)") from None
    if value <= 0:
        raise ValueError(f"parameter count must be positive, got {text!r}")
    return value


# roofline ------------------------------------------------------------------------------------------

def _add_hardware_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", default="this",
                   help=f"a preset ({', '.join(HARDWARE)}) or 'this' to measure this machine (default)")
    p.add_argument("--bandwidth", type=float, default=None, help="custom roof: memory bandwidth in GB/s")
    p.add_argument("--flops", type=float, default=None, help="custom roof: peak TFLOP/s")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="activation / compute dtype (default: fp32 on this machine, as loom runs; fp16 on presets)")
    p.add_argument("--weight-dtype", default=None, choices=list(DTYPE_BYTES), help="weights (default: --dtype)")
    p.add_argument("--kv-dtype", default=None, choices=list(DTYPE_BYTES), help="KV cache (default: --dtype)")


def _hardware(args: argparse.Namespace) -> tuple[Hardware, bool]:
    """The roof, and whether it is this machine's."""
    if (args.bandwidth is None) != (args.flops is None):
        raise ValueError("--bandwidth and --flops go together")
    if args.bandwidth is not None:
        return custom_hardware(args.bandwidth, args.flops), False
    return get_hardware(args.hardware), args.hardware.lower() in THIS_MACHINE


def _precision(args: argparse.Namespace, this_machine: bool) -> Precision:
    dtype = args.dtype or ("fp32" if this_machine else "fp16")
    return Precision.of(dtype, args.weight_dtype, args.kv_dtype)


def _roofline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"a preset ({_MODELS}) or a .gguf / HF folder (default: smollm2-135m)")
    p.add_argument("--phase", default="decode", choices=["prefill", "decode"])
    p.add_argument("--n", type=int, default=1, help="new tokens: prefill length, or decode sequences (one token each)")
    p.add_argument("--l", type=int, default=None, help="keys attended (context); default n for prefill, 1 for decode")
    _add_hardware_args(p)
    p.add_argument("--json", action="store_true")


def _roofline(args: argparse.Namespace) -> int:
    from loom.analysis.roofline import GROUPS, analyze

    config = resolve_model(args.model)
    hw, this = _hardware(args)
    report = analyze(config, args.phase, args.n, args.l, hw, _precision(args, this))
    if args.json:
        _print_json(report.to_dict())
        return 0
    d = report.to_dict()
    p = report.precision
    print(f"{report.model}  {report.phase}: n={report.n} new token(s), l={report.l} keys  "
          f"(weights {p.names['weight']}, KV {p.names['kv']}, activations {p.names['act']})")
    print(f"{hw.name}: {hw.bandwidth / 1e9:.4g} GB/s, {si(d['peak_flops'], 'FLOP/s')} ({p.compute}); "
          f"ridge {d['ridge_flop_per_byte']:.3g} FLOP/byte")
    print()
    rows = []
    for r in report.rows:
        o = r.op
        rows.append([o.name, o.shape, o.count, si(o.flops), si(o.mops), f"{o.intensity:.4g}",
                     f"{r.intensity_bytes:.3g}", r.bound, seconds(r.time_s)])
    print(table(["operator", "shape (per instance)", "count", "FLOPs", "MOPs (elem)", "FLOP/elem", "FLOP/byte",
                 "bound", "time (all)"], rows, right=[False, False] + [True] * 7))
    print()
    groups = d["groups"]
    grows = [[GROUPS[g], si(t["flops"] / report.tokens), si(t["mops"] / report.tokens),
              si(t["bytes"] / report.tokens, "B"), f"{t['flops'] / t['mops']:.4g}" if t["mops"] else "-",
              seconds(t["time_s"]), f"{100 * t['time_s'] / report.time_s:.1f}%"] for g, t in groups.items()]
    tot = d["total"]
    grows.append(["total", si(tot["flops"] / report.tokens), si(tot["mops"] / report.tokens),
                  si(tot["bytes"] / report.tokens, "B"), f"{tot['intensity_flop_per_element']:.4g}",
                  seconds(tot["time_s"]), "100%"])
    print(table(["group", "FLOPs/token", "MOPs/token", "bytes/token", "FLOP/elem", "time (step)", "share"], grows,
                right=[False] + [True] * 6))
    pt = d["per_token"]
    print(f"\nper token: {si(pt['flops'], 'FLOP')}, {si(pt['bytes'], 'B')}; at the roof >= {seconds(pt['time_s'])}"
          f" per token, <= {pt['tokens_per_s_bound']:.4g} tokens/s")
    return 0


def _intensity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--l", default="128,512,4096,32000", help="comma-separated context lengths")
    p.add_argument("--n", default="1,2,4,8,128,512,4096", help="comma-separated token counts")
    p.add_argument("--json", action="store_true")


def _intensity(args: argparse.Namespace) -> int:
    from loom.analysis.roofline import intensity_tables

    ls = tuple(int(x) for x in args.l.split(","))
    ns = tuple(int(x) for x in args.n.split(","))
    tables = intensity_tables(args.d, args.heads, args.ffn, ls, ns)
    if args.json:
        _print_json({name: {str(l): {str(n): v for n, v in row.items()} for l, row in tab.items()}
                     for name, tab in tables.items()})
        return 0
    for name, tab in tables.items():
        print(f"{name}  (d={args.d}, h={args.heads}, n_ff={args.ffn}): FLOPs / MOPs")
        print(table(["l \\ n", *map(str, ns)], [[l, *("-" if v is None else f"{v:.7g}" for v in row.values())]
                                                for l, row in tab.items()]))
        print()
    return 0


# memory --------------------------------------------------------------------------------------------

def _memory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"a preset ({_MODELS}) or a model path (default: smollm2-135m)")
    p.add_argument("--params", default=None, help="a bare parameter count instead of a model, e.g. 1B, 7e9")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPE_BYTES))
    p.add_argument("--kv-dtype", default=None, choices=list(DTYPE_BYTES), help="KV cache dtype (default: --dtype)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train", action="store_true")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "sgd-momentum"])
    p.add_argument("--mixed-precision", action="store_true",
                   help="16-bit weights/gradients with fp32 master weights and fp32 optimizer states")
    p.add_argument("--activations", default=None, choices=["analytic", "seed"],
                   help="analytic (from batch x context; default with a model) or seed 003's 8 B/param at fp32")
    p.add_argument("--json", action="store_true")


def _memory(args: argparse.Namespace) -> int:
    from loom.analysis.memory import estimate_memory

    config = None
    params = None
    if args.params is not None:
        if args.model is not None:
            raise ValueError("give --model or --params, not both")
        params = _parse_count(args.params)
        if args.activations == "analytic":
            raise ValueError("analytic activations need a model (--model); with --params use --activations seed")
    else:
        config = resolve_model(args.model)
    activations = args.activations or ("seed" if config is None else "analytic")
    est = estimate_memory(config, parameters=params, dtype=args.dtype, context=args.context if config else 0,
                          batch=args.batch, train=args.train, optimizer=args.optimizer, kv_dtype=args.kv_dtype,
                          activations=activations, mixed_precision=args.mixed_precision)
    if args.json:
        _print_json(est.to_dict())
        return 0
    what = config.name if config else "a bare parameter count"
    mode = f"training ({args.optimizer}{', mixed precision' if args.mixed_precision else ''})" if args.train \
        else "inference"
    print(f"{what}: {est.parameters:,.0f} parameters, {args.dtype}, {mode}, batch {args.batch}"
          + (f", context {args.context}" if config else "") + f"; activations: {activations}")
    rows = [["weights", binary(est.weights), si(est.weights, "B")]]
    if not args.train:
        rows.append(["KV cache", binary(est.kv_cache), si(est.kv_cache, "B")])
        if config is not None and config.is_mla:
            rows.append([f"  (as MHA: {est.kv_cache_mha / est.kv_cache:.1f}x)" if est.kv_cache else "  (as MHA)",
                         binary(est.kv_cache_mha), si(est.kv_cache_mha, "B")])
    rows.append(["activations", binary(est.activations), si(est.activations, "B")])
    if args.train:
        rows += [["gradients", binary(est.gradients), si(est.gradients, "B")],
                 ["optimizer states", binary(est.optimizer_states), si(est.optimizer_states, "B")]]
        if est.master_weights:
            rows.append(["fp32 master weights", binary(est.master_weights), si(est.master_weights, "B")])
    rows.append(["total", binary(est.total), si(est.total, "B")])
    print(table(["component", "bytes (binary)", "bytes (decimal)"], rows, right=[False, True, True]))
    if config is not None and config.is_mla and not args.train:
        print(f"KV per token: {est.kv_per_token:,.0f} B, latent attention's c_kv ({config.kv_lora_rank}) + k_rope "
              f"({config.qk_rope_head_dim}) x {config.num_layers} layers; as MHA {est.kv_per_token_mha:,.0f} B "
              f"({config.num_heads} heads x keys {config.head_dim} + values {config.v_head_dim})")
    return 0


# offload, speculative ------------------------------------------------------------------------------

def _offload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-bytes", required=True, help="e.g. 7.7GB")
    p.add_argument("--memory-bytes", required=True, help="e.g. 3.5GB")
    p.add_argument("--storage-bandwidth", required=True, help="bytes per second, e.g. 4GB")
    p.add_argument("--kv-bytes", default="0", help="KV cache that must also be resident")
    p.add_argument("--resident-bytes", default="0", help="memory already taken (e.g. a draft model)")
    p.add_argument("--json", action="store_true")


def _offload(args: argparse.Namespace) -> int:
    from loom.analysis.offload import offload_limit

    r = offload_limit(_parse_bytes(args.model_bytes), _parse_bytes(args.memory_bytes),
                      _parse_bytes(args.storage_bandwidth), _parse_bytes(args.kv_bytes),
                      _parse_bytes(args.resident_bytes))
    if args.json:
        _print_json(r.to_dict())
        return 0
    print(table(["quantity", "value"], [
        ["model", si(r.model_bytes, "B")], ["KV cache", si(r.kv_cache_bytes, "B")],
        ["memory", si(r.memory_bytes, "B")], ["already resident", si(r.resident_bytes, "B")],
        ["storage bandwidth", si(r.storage_bandwidth, "B/s")], ["streamed per token", si(r.streamed_bytes, "B")],
        ["latency floor", f"{r.latency_s:.3g} s/token"],
        ["maximum speed", "not limited by storage" if r.tokens_per_s is None else f"{r.tokens_per_s:.3g} tokens/s"],
    ], right=[False, True]))
    return 0


def _speculative_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, required=True, help="draft tokens per step")
    p.add_argument("--acceptance", type=float, required=True, help="acceptance rate a in [0, 1]")
    p.add_argument("--cost-ratio", type=float, required=True, help="draft step cost / target step cost")
    p.add_argument("--k-max", type=int, default=64, help="search the best k up to this")
    p.add_argument("--json", action="store_true")


def _speculative(args: argparse.Namespace) -> int:
    from loom.analysis.speculative import estimate, expected_tokens, speedup

    e = estimate(args.k, args.acceptance, args.cost_ratio, args.k_max)
    if args.json:
        _print_json(e.to_dict())
        return 0
    print(f"acceptance a = {e.acceptance}, draft / target cost c = {e.cost_ratio}")
    ks = sorted(set(range(0, max(8, e.k) + 1)) | {e.best_k})
    rows = [[k, f"{expected_tokens(k, e.acceptance):.4g}", f"{speedup(k, e.acceptance, e.cost_ratio):.4g}",
             ("<- asked" if k == e.k else "") + (" <- best" if k == e.best_k else "")] for k in ks]
    print(table(["k", "tokens / target step", "speedup", ""], rows, right=[True, True, True, False]))
    print(f"\nk = {e.k}: {e.expected_tokens_per_step:.4g} tokens per target step, speedup {e.speedup:.4g}x; "
          f"best k = {e.best_k} ({e.best_speedup:.4g}x)")
    return 0


# probe, plot ---------------------------------------------------------------------------------------

def _probe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--buffer", default="256MiB", help="bandwidth buffer (far larger than the caches)")
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")


def _probe(args: argparse.Namespace) -> int:
    from loom.analysis.probe import probe

    r = probe(int(_parse_bytes(args.buffer)), args.matmul_size, args.repeats)
    if args.json:
        _print_json(r.to_dict())
        return 0
    print(f"{r.cpu}, torch threads {r.threads}")
    print(table(["measure", "value", "how"], [
        ["memory bandwidth", f"{r.bandwidth / 1e9:.3g} GB/s", "the faster of the two below"],
        ["  reduction (sum)", f"{r.bandwidth_sum / 1e9:.3g} GB/s", f"x.sum() over {binary(r.bandwidth_buffer_bytes)}"],
        ["  GEMV", f"{r.bandwidth_gemv / 1e9:.3g} GB/s", f"W @ x, W {binary(r.bandwidth_buffer_bytes)} fp32"],
        ["matmul", f"{r.matmul_flops / 1e9:.3g} GFLOP/s", f"fp32 {r.matmul_size}x{r.matmul_size} @ "
                                                        f"{r.matmul_size}x{r.matmul_size}, best of {args.repeats}"],
        ["ridge point", f"{r.matmul_flops / r.bandwidth:.3g} FLOP/byte", "matmul / bandwidth"],
    ], right=[False, True, False]))
    return 0


def _measure_path(spec: str | None) -> str | None:
    if spec is None or spec.lower() == "smollm2-135m":
        return None  # loom's default model file
    if spec.lower() in MODELS:
        raise ValueError(f"--measure needs a model file loom can load; {spec!r} is only a preset")
    return spec


def _plot_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"a preset ({_MODELS}) or a model path (default: smollm2-135m)")
    _add_hardware_args(p)
    p.add_argument("--prompt-len", type=int, default=128, help="prefill length (and the bench prompt)")
    p.add_argument("--gen-len", type=int, default=32, help="decode tokens; decode is placed at l = prompt + gen/2")
    p.add_argument("--decode-l", type=int, default=None,
                   help="context of the decode step drawn (default prompt + gen/2; measured runs fix it)")
    p.add_argument("--measure", action="store_true",
                   help="time loom's prefill and decode (bench latency's runner, prefix caching off) and add them")
    p.add_argument("--bench-json", default=None,
                   help="add the points of a saved `loom bench latency --json` (or `loom analyze plot --json`'s "
                        "bench); note bench latency's best prefill of repeats >= 2 reuses the prefix cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--title", default=None)
    p.add_argument("--out", default="roofline.png")
    p.add_argument("--json", action="store_true")


def _plot(args: argparse.Namespace) -> int:
    from loom.analysis.measured import decode_context, measure_loom, points_from_bench, precision_from_bench
    from loom.analysis.plot import plot_roofline
    from loom.analysis.presets import read_model_config
    from loom.analysis.roofline import analyze

    bench = None
    if args.bench_json:
        with open(args.bench_json) as f:
            bench = json.load(f)
    elif args.measure:
        bench = measure_loom(_measure_path(args.model), args.prompt_len, args.gen_len, args.repeats)
    if isinstance(bench, dict) and "bench" in bench and "results" not in bench:
        bench = bench["bench"]  # the JSON of an earlier `loom analyze plot --json`
    hw, this = _hardware(args)
    if bench is not None:
        config = read_model_config(bench["model"])
        label = os.path.basename(os.path.normpath(bench["model"]))
        precision = precision_from_bench(config, bench)
        prompt_len, decode_l = bench["prompt_len"], decode_context(bench)
        measured = points_from_bench(bench, config, precision)
    else:
        config = resolve_model(args.model)
        label = config.name or os.path.basename(os.path.normpath(args.model or "model"))
        precision = _precision(args, this)
        prompt_len = args.prompt_len
        decode_l = args.decode_l or args.prompt_len + args.gen_len // 2
        measured = []
    reports = [analyze(config, "prefill", prompt_len, prompt_len, hw, precision),
               analyze(config, "decode", 1, decode_l, hw, precision)]
    title = args.title or f"{label} on {hw.name}: prefill n={prompt_len}, decode at l={decode_l}"
    plot_roofline(hw, reports, args.out, measured, precision.compute, title)
    result = {"out": args.out, "hardware": hw.to_dict(), "precision": precision.names,
              "analytic": [{"phase": r.phase, "n": r.n, "l": r.l, "flops": r.flops, "bytes": r.bytes,
                            "intensity_flop_per_byte": r.intensity_bytes,
                            "attainable_flops": hw.attainable(r.intensity_bytes, precision.compute)} for r in reports],
              "measured": [m.to_dict() | {"fraction_of_roof": m.achieved_flops / hw.attainable(m.intensity,
                                                                                                  precision.compute)}
                           for m in measured],
              "bench": bench}
    if args.json:
        _print_json(result)
        return 0
    print(f"wrote {args.out}  ({hw.name}: {hw.bandwidth / 1e9:.3g} GB/s, "
          f"{si(hw.flops(precision.compute), 'FLOP/s')}, ridge {hw.ridge(precision.compute):.3g} FLOP/B)")
    rows = [[f"{r.phase} n={r.n} l={r.l} (analytic)", si(r.flops, "FLOP"), si(r.bytes, "B"),
             f"{r.intensity_bytes:.3g}", si(hw.attainable(r.intensity_bytes, precision.compute), "FLOP/s"), "-", "-"]
            for r in reports]
    for m in result["measured"]:
        rows.append([m["label"] + " (measured)", si(m["flops"], "FLOP"), si(m["bytes"], "B"),
                     f"{m['intensity_flop_per_byte']:.3g}", si(m["achieved_flops"], "FLOP/s"),
                     si(m["achieved_bandwidth_Bps"], "B/s"), f"{100 * m['fraction_of_roof']:.1f}%"])
    print(table(["point", "FLOPs", "bytes", "FLOP/B", "FLOP/s", "bytes/s", "of roof"], rows,
                right=[False] + [True] * 6))
    return 0


def _spatten_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights", default="fp32", choices=WEIGHTS)
    p.add_argument("--corpus", default="britannica")
    p.add_argument("--window", type=int, default=1024, help="prompt + scored tail, tokens")
    p.add_argument("--tail", type=int, default=64, help="tokens scored after the pruned prompt")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--keep", default="0.75,0.5,0.25", help="comma-separated final token keep fractions")
    p.add_argument("--scorers", default="importance,importance-mean,random,recent",
                   help="importance (SpAtten), importance-mean (per-query mean), random, recent")
    p.add_argument("--head-keep", default="", help="comma-separated head keep fractions (SpAtten head pruning)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")


def _floats(text: str) -> list[float]:
    """'0.75,0.5' -> [0.75, 0.5]; '' -> []."""
    return [float(x) for x in text.split(",") if x]


def _spatten(args: argparse.Namespace) -> int:
    from loom.analysis.spatten import format_spatten, run_spatten

    use_threads(args)
    result = run_spatten(args.model, window=args.window, tail=args.tail, windows=args.windows, keeps=_floats(args.keep),
                         scorers=[s for s in args.scorers.split(",") if s], head_keeps=_floats(args.head_keep),
                         corpus=args.corpus, weights=args.weights, progress=not args.no_progress)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        _print_json(result)
    else:
        print(f"tail of {result['tail']} tokens after a {result['prompt_tokens']}-token pruned prompt, "
              f"{result['windows']} windows of {result['corpus']} ({result['seconds']:.0f} s)")
        print(format_spatten(result))
    return 0



# parallel ------------------------------------------------------------------------------------------

def _parallel_options(p: argparse.ArgumentParser) -> None:
    from loom.analysis.presets import LINKS

    p.add_argument("--model", default="llama-2-7b", help=f"a preset ({_MODELS}) or a model path")
    p.add_argument("--hardware", default="a100", help=f"a preset ({', '.join(HARDWARE)}) or 'this'")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"], help="activations and weights")
    p.add_argument("--ranks", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--links", default="nvlink,pcie", help=f"comma-separated, of {', '.join(LINKS)}")
    p.add_argument("--link-bandwidth", type=float, default=None, metavar="GBPS",
                   help="add a custom link: bandwidth per direction, GB/s (with --link-alpha-us)")
    p.add_argument("--link-alpha-us", type=float, default=None, help="the custom link's latency per step, us")
    p.add_argument("--tokens", type=int, default=1, help="sequences decoded together (one token each)")
    p.add_argument("--context", type=int, default=1024, help="keys each decoded token attends")
    p.add_argument("--seq-len", type=int, default=2048, help="training windows (the DP table)")
    p.add_argument("--batch-per-rank", type=int, default=1, help="training windows per rank and step")
    p.add_argument("--measure", action="store_true",
                   help="time gloo all-reduces between 2 processes on this machine's loopback, fit alpha and "
                        "beta, and time one TP=2 decode step's all-reduces of --measure-model")
    p.add_argument("--measure-model", default="smollm2-135m",
                   help="whose decode step --measure times (2 x layers all-reduces of [tokens, hidden] fp32)")
    p.add_argument("--repeats", type=int, default=50, help="all-reduces timed per message size")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the chart here")
    p.add_argument("--json", action="store_true")


def _parallel_links(args: argparse.Namespace) -> list:
    from loom.analysis.presets import Link, get_link

    links = [get_link(name) for name in args.links.split(",") if name]
    if (args.link_bandwidth is None) != (args.link_alpha_us is None):
        raise ValueError("--link-bandwidth and --link-alpha-us go together")
    if args.link_bandwidth is not None:
        if args.link_bandwidth <= 0 or args.link_alpha_us < 0:
            raise ValueError("--link-bandwidth must be positive and --link-alpha-us not negative")
        links.append(Link(f"custom ({args.link_bandwidth:g} GB/s, {args.link_alpha_us:g} us)",
                          args.link_bandwidth * 1e9, args.link_alpha_us * 1e-6))
    if not links:
        raise ValueError("--links names no link")
    return links


def _parallel(args: argparse.Namespace) -> int:
    from loom.analysis.parallel import dp_step, tp_table
    from loom.analysis.presets import get_link

    config = resolve_model(args.model)
    hw = get_hardware(args.hardware)
    precision = Precision.of(args.dtype)
    ranks = [int(x) for x in args.ranks.split(",") if x]
    links = _parallel_links(args)
    rows = tp_table(config, ranks, links, hw, precision, args.tokens, args.context)
    dp = [dp_step(config, n, link, hw, precision, strategy, args.batch_per_rank, args.seq_len)
          for strategy in ("ddp", "fsdp") for link in links for n in ranks if n > 1]
    measured = None
    if args.measure:
        from loom.analysis.collectives import measure_allreduce

        mcfg = resolve_model(args.measure_model)
        measured = measure_allreduce(repeats=args.repeats, step_allreduces=2 * mcfg.num_layers,
                                     step_bytes=args.tokens * mcfg.hidden_size * 4)
        measured.fit()
    if args.plot:
        from loom.analysis.plot import plot_parallel

        plot_links = links if measured is not None else links + [get_link("loopback")]
        messages = [(f"{config.name} decode ({args.dtype})", rows[0].allreduce_bytes)]
        if measured is not None:
            messages.append((f"{args.measure_model} decode (fp32)", measured.step_bytes))
        plot_parallel(rows, plot_links, args.plot, measured, messages)
    result = {"model": config.name, "hardware": hw.to_dict(), "precision": precision.names,
              "links": [link.to_dict() for link in links], "tensor_parallel_decode": [r.to_dict() for r in rows],
              "data_parallel_step": [d.to_dict() for d in dp],
              "measured": measured.to_dict() if measured is not None else None, "plot": args.plot}
    if args.json:
        _print_json(result)
        return 0
    _print_parallel(config, hw, args, rows, dp, measured)
    return 0


def _print_parallel(config: Any, hw: Hardware, args: argparse.Namespace, rows: list, dp: list, measured: Any) -> None:
    from loom.analysis.parallel import allreduce_time

    print(f"{config.name}, {args.dtype}, on {hw.name}: tensor-parallel decode of {args.tokens} sequence(s) at "
          f"l={args.context}; {rows[0].allreduces} all-reduces per step of {si(rows[0].allreduce_bytes, 'B')}")
    print(table(["link", "N", "compute+memory / N", "bytes moved / rank / all-reduce", "one all-reduce",
                 "all-reduces", "per token", "speedup", "efficiency"],
                [[r.link, r.ranks, seconds(r.compute_s), si(r.moved_bytes_per_rank, "B"), seconds(r.allreduce_s),
                  seconds(r.comm_s), seconds(r.per_token_s), f"{r.speedup:.2f}x", f"{100 * r.speedup / r.ranks:.0f}%"]
                 for r in rows], right=[False] + [True] * 8))
    if dp:
        print(f"\ndata-parallel training, full fine-tuning: {args.batch_per_rank} window(s) of {args.seq_len} per "
              "rank and step; compute = 3 forwards at the roofline, communication not overlapped")
        print(table(["strategy", "link", "N", "bytes moved / rank / step", "bytes / token", "communication",
                     "compute", "tokens/s"],
                    [[d.strategy, d.link, d.ranks, si(d.moved_bytes_per_rank, "B"),
                      si(d.moved_bytes_per_rank / d.tokens_per_rank, "B"), seconds(d.comm_s), seconds(d.compute_s),
                      f"{d.tokens_per_s:.4g}"] for d in dp], right=[False, False] + [True] * 6))
    if measured is not None:
        link = measured.link
        print(f"\nmeasured on this machine: gloo all-reduce between {measured.ranks} processes over loopback "
              f"(best / median of {measured.repeats})")
        print(table(["message", "best", "median", "alpha-beta fit"],
                    [[si(m, "B"), seconds(t), seconds(md), seconds(allreduce_time(m, measured.ranks, link))]
                     for m, t, md in zip(measured.sizes, measured.seconds, measured.median_seconds)],
                    right=[True] * 4))
        print(f"fit: alpha {link.latency * 1e6:.3g} us per step, beta {link.bandwidth / 1e9:.3g} GB/s")
        print(f"a TP=2 decode step of {args.measure_model}: {measured.step_allreduces} all-reduces of "
              f"{si(measured.step_bytes, 'B')} back to back: measured {seconds(measured.step_seconds)} (best; median "
              f"{seconds(measured.step_median_seconds)}), alpha-beta predicts "
              f"{seconds(measured.predicted_step_seconds(link))}")
    if args.plot:
        print(f"\nwrote {args.plot}")

ANALYSES = {
    "roofline": Subcommand("per-operator FLOPs, MOPs, arithmetic intensity and bound (seed 002)",
                           _roofline_options, _roofline),
    "intensity": Subcommand("seed 002's arithmetic-intensity tables (MHA casting, act-to-act, FFN)",
                            _intensity_options, _intensity),
    "memory": Subcommand("weights, KV cache, activations, gradients, optimizer states (seeds 001, 003)",
                         _memory_options, _memory),
    "offload": Subcommand("seed 002's speed limit when the model does not fit in memory", _offload_options, _offload),
    "speculative": Subcommand("expected tokens per step and speedup of speculative decoding",
                              _speculative_options, _speculative),
    "probe": Subcommand("measure this machine's memory bandwidth and matmul FLOP/s", _probe_options, _probe),
    "plot": Subcommand("roofline PNG: operators of prefill and decode, and loom's measured runs",
                       _plot_options, _plot),
    "spatten": Subcommand("SpAtten cascade token / head pruning of the prompt: quality and cost",
                          _spatten_options, _spatten),
    "parallel": Subcommand("tensor / data parallelism: all-reduce bytes and alpha-beta time next to the roofline",
                           _parallel_options, _parallel),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    a = subparsers.add_parser("analyze", help="roofline, FLOPs/MOPs, memory, offload and speculative calculators")
    register_subcommands(a, "analyze", ANALYSES)


def run(args: argparse.Namespace) -> int | None:
    return ANALYSES[args.analyze].run(args)
