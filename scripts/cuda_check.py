"""Check and measure loom on a CUDA GPU in one run; writes JSON under --out and prints a table last.

    python scripts/cuda_check.py --tokenizer DIR --out OUT [--quick]

1. Builds HF's LlamaForCausalLM with SmolLM2-135M's exact configuration and seeded random weights
   (speed does not depend on weight values), and an RTN int4 (group 32) loom checkpoint of it.
2. Measures the GPU's ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 GEMM.
3. Quick correctness: loom vs HF transformers logits on the same weights (fp32 and bf16).
4. Kernels: torch's int4 CUDA GEMV against the bf16 GEMV on SmolLM2's linear shapes.
5. The decode step: kernels launched per token, GPU time of a CUDA-graph replay vs the eager step.
6. The benchmarks, through the CLI's own entry point (each command is recorded beside its result):
   `loom bench latency` (batch 1) and `loom bench throughput` (64 x 128 in / 128 out), bf16 and int4,
   loom on CUDA against HF transformers on CUDA in the same process.
7. Where a throughput run's time goes: each engine step timed, the runner apart from the rest.
``--compile-experiment`` instead runs only the torch.compile-inside-a-CUDA-graph experiment.
Correctness proper is asserted by ``python -m pytest tests_cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import torch

from loom.analysis.hardware import cuda_median_seconds

RESULTS: dict[str, Any] = {}
OUT_FILE = ""


def section(name: str) -> Callable[[Callable[[], Any]], Any]:
    """Run a section, record its result (or its error) under ``name``; never stop the run."""
    def run(fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one failure must not hide the rest
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{name}] FAILED: {e}", flush=True)
        print(f"[{name}] {time.perf_counter() - t:.1f} s", flush=True)
        free_gpu()
        if OUT_FILE:  # after every section: a run cut short keeps what it measured
            with open(OUT_FILE, "w") as f:
                json.dump(RESULTS, f, indent=2)
        return RESULTS[name]
    return run


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def cuda_time(fn: Callable[[], Any], repeats: int = 50, warmup: int = 5) -> float:
    """Median seconds of ``fn`` by CUDA events."""
    return cuda_median_seconds(fn, repeats, warmup)


def cli_json(argv: list[str]) -> dict[str, Any]:
    """Run `loom ARGV --json` in this process; its JSON and the command line."""
    from loom.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv + ["--json"])
    if code != 0:
        raise RuntimeError(f"loom {' '.join(argv)} exited {code}")
    return {"command": "loom " + " ".join(argv) + " --json", "result": json.loads(buf.getvalue())}


def ceilings() -> dict[str, Any]:
    from loom.analysis.hardware import measure_device_bandwidth

    bw = measure_device_bandwidth("cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    s = cuda_time(lambda: a @ b, repeats=10, warmup=3)
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "copy_bandwidth_GBps": bw["copy"] / 1e9, "read_bandwidth_GBps": bw["read"] / 1e9,
            "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / s / 1e12}


def parity(model_dir: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from loom.weights.loader import load_model

    ids = torch.randint(3, 49152, (200,), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to("cuda")
        want = ref(ids[None].cuda()).logits[0].double()
        del ref
        for weights in ("fp32", "bf16"):
            m = load_model(model_dir, weights=weights, device="cuda").model
            got = m.logits(ids.cuda()).double()
            out[f"loom_{weights}_vs_hf_fp32_rel"] = float((got - want).abs().max() / want.abs().max())
            del m
        hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to("cuda")
        got = hf16(ids[None].cuda()).logits[0].double()
        out["hf_bf16_vs_hf_fp32_rel"] = float((got - want).abs().max() / want.abs().max())
    return out


def kernels() -> dict[str, Any]:
    """Per-call time of each SmolLM2 linear at 1 and 64 rows: bf16 F.linear vs int4 _weight_int4pack_mm
    (groups 32 and 64), timed as CUDA-graph replays of 20 calls (GPU time, no launch gaps) and eagerly."""
    from loom.compress.quantize.rtn import QuantConfig, rtn_quantize
    from loom.layers.quantized import QuantizedLinear

    shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
              "lm_head": (49152, 576)}
    rows_out = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        layers = {"bf16": lambda x, w16=w.to(torch.bfloat16): torch.nn.functional.linear(x, w16)}
        for g in (32, 64):  # groups that divide every input size here (576 = 9 x 64)
            layers[f"int4 g{g}"] = QuantizedLinear(rtn_quantize(w, QuantConfig(4, g)))
        for m in (1, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for label, f in layers.items():
                eager = cuda_time(lambda: f(x), repeats=100)
                f(x)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        f(x)
                replay = cuda_time(graph.replay, repeats=30) / 20
                weight_bytes = n * k * 2 if label == "bf16" else layers[label].weight_bytes()
                rows_out.append({"linear": name, "n": n, "k": k, "rows": m, "kernel": label,
                                 "eager_us": eager * 1e6, "graph_us": replay * 1e6, "weight_bytes": weight_bytes,
                                 "graph_GBps": weight_bytes / replay / 1e9})
    return {"rows": rows_out}


def decode_step(model_dir: str, weights: str) -> dict[str, Any]:
    """One batch-1 decode step at context 100: CUDA kernels it launches (profiler), eager wall time, and
    the GPU time of its CUDA-graph replay; the weight bytes it reads over the copy bandwidth is the floor."""
    from loom.analysis.traffic import decode_bytes_per_token
    from loom.config import CacheConfig
    from loom.llm import LLM
    from loom.engine.step import DecodeBatch
    from loom.engine.step.cuda_graph import CudaGraphStep, decode_forward

    llm = LLM(model_dir, device="cuda", weights=weights, cache=CacheConfig(memory_bytes=1 << 30))
    model, kv = llm.model, llm.engine.kv_cache
    ctx = 100
    inputs = [torch.tensor([7]), torch.tensor([ctx - 1]), torch.tensor([ctx - 1]),
              torch.arange(8, dtype=torch.long)[None], torch.tensor([ctx])]  # block 0..7: 128 slots >= ctx
    dev = [t.cuda() for t in inputs]
    with torch.inference_mode():
        eager = cuda_time(lambda: decode_forward(model, *dev, list(kv.k), list(kv.v)), repeats=30)
        graphs = CudaGraphStep(model, kv.k, kv.v)
        graphs(DecodeBatch(*inputs))
        entry = next(iter(graphs.graphs.values()))
        replay = cuda_time(entry.graph.replay, repeats=50)
        full_call = cuda_time(lambda: graphs(DecodeBatch(*inputs)), repeats=50)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode_forward(model, *dev, list(kv.k), list(kv.v))
            torch.cuda.synchronize()
        launched = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    bytes_tok = decode_bytes_per_token(model, ctx)
    return {"weights": weights, "dtype": str(model.dtype), "context": ctx, "cuda_kernels_per_step": launched,
            "eager_step_ms": eager * 1e3, "graph_replay_ms": replay * 1e3,
            "graph_call_ms": full_call * 1e3, "bytes_per_token": bytes_tok}


def step_breakdown(model_dir: str, weights: str) -> dict[str, Any]:
    """Where a throughput run's time goes: each engine step timed (GPU synchronized), and inside it the
    runner (forward + CUDA-graph replay) apart from the rest (scheduling, sampling, detokenizing)."""
    from loom.bench.throughput import random_prompts
    from loom.config import CacheConfig, SchedulerConfig
    from loom.device import synchronize
    from loom.llm import LLM
    from loom.sampling_params import SamplingParams

    llm = LLM(model_dir, device="cuda", weights=weights, cache=CacheConfig(memory_bytes=4 << 30),
              scheduler=SchedulerConfig(max_num_batched_tokens=8192))
    engine, runner = llm.engine, llm.engine.runner
    inner = runner.execute
    spent: list[float] = []

    def timed(scheduled):  # type: ignore[no-untyped-def]
        synchronize("cuda")
        t = time.perf_counter()
        out = inner(scheduled)
        synchronize("cuda")
        spent.append(time.perf_counter() - t)
        return out

    runner.execute = timed
    prompts = random_prompts(64, 128, llm.config.vocab_size, 0, avoid=(1, 2))
    params = SamplingParams(temperature=0.0, max_tokens=128, min_tokens=128)
    result: dict[str, Any] = {}
    for run in ("warm-up", "timed"):
        engine.block_manager.reset_prefix_cache()
        spent.clear()
        steps = []
        for i, q in enumerate(prompts):
            engine.add_request(f"{run}-{i}", q, params)
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            synchronize("cuda")
            steps.append(time.perf_counter() - t)
        result = {"steps": len(steps), "first_step_ms": steps[0] * 1e3, "first_step_runner_ms": spent[0] * 1e3,
                  "decode_step_ms_median": sorted(steps[1:])[len(steps) // 2 - 1] * 1e3,
                  "decode_runner_ms_median": sorted(spent[1:])[len(spent) // 2 - 1] * 1e3,
                  "total_s": sum(steps), "runner_total_s": sum(spent)}
    return result


def compiled_graph(model_dir: str) -> dict[str, Any]:
    """Experiment: CUDA graphs of torch.compile(decode_forward) against plain ones, one batch-1 step at
    context 100 (bf16): compile time, logits agreement, kernels per step, replay time."""
    from loom.config import CacheConfig
    from loom.llm import LLM
    from loom.engine.step import DecodeBatch
    from loom.engine.step.cuda_graph import CudaGraphStep

    llm = LLM(model_dir, device="cuda", weights="bf16", cache=CacheConfig(memory_bytes=1 << 30))
    kv = llm.engine.kv_cache
    ctx = 100
    inputs = [torch.tensor([7]), torch.tensor([ctx - 1]), torch.tensor([ctx - 1]),
              torch.arange(8, dtype=torch.long)[None], torch.tensor([ctx])]
    with torch.inference_mode():
        plain = CudaGraphStep(llm.model, kv.k, kv.v)
        want = plain(DecodeBatch(*inputs))
        t = time.perf_counter()
        comp = CudaGraphStep(llm.model, kv.k, kv.v, compile=True)
        got = comp(DecodeBatch(*inputs))
        compile_s = time.perf_counter() - t
        rel = float((got - want).abs().max() / want.abs().max())
        same_token = int(got.argmax()) == int(want.argmax())
        replay = {name: cuda_time(next(iter(g.graphs.values())).graph.replay, repeats=50) * 1e3
                  for name, g in (("plain", plain), ("compiled", comp))}
        from torch.profiler import ProfilerActivity, profile

        dev = [x.cuda() for x in inputs]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            comp.forward(llm.model, *dev, comp.k, comp.v)
            torch.cuda.synchronize()
        kernels_compiled = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"compile_s": compile_s, "logits_rel_vs_plain": rel, "same_argmax": same_token,
            "replay_ms_plain": replay["plain"], "replay_ms_compiled": replay["compiled"],
            "cuda_kernels_per_step_compiled": kernels_compiled}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None, help="folder with SmolLM2's tokenizer.json")
    ap.add_argument("--out", default=os.environ.get("OUT", "cuda-out"))
    ap.add_argument("--work", default="/tmp/loom-cuda")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--compile-experiment", action="store_true",
                    help="only the torch.compile experiment (writes compile_experiment.json)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global OUT_FILE
    OUT_FILE = os.path.join(args.out, "compile_experiment.json" if args.compile_experiment else "cuda_check.json")
    from loom.bench.random_model import save_random_llama

    dense = os.path.join(args.work, "smollm2-135m-random")
    int4 = dense + "-rtn-w4g32"
    t = time.perf_counter()
    if not os.path.exists(os.path.join(dense, "config.json")):
        save_random_llama(dense, seed=0, tokenizer_dir=args.tokenizer)
    print(f"[model] {time.perf_counter() - t:.1f} s", flush=True)
    reps = "2" if args.quick else "5"
    if args.compile_experiment:
        section("compiled_graph")(lambda: compiled_graph(dense))
        with open(os.path.join(args.out, "compile_experiment.json"), "w") as f:
            json.dump(RESULTS, f, indent=2)
        print(json.dumps({k: v for k, v in RESULTS["compiled_graph"].items() if k != "traceback"}, indent=1))
        return 0

    section("ceilings")(ceilings)
    section("parity")(lambda: parity(dense))
    section("quantize_int4")(lambda: cli_json(["quantize", "--model", dense, "--method", "rtn", "--bits", "4",
                                               "--group-size", "32", "--out", int4]))
    section("kernels")(kernels)
    section("decode_step_bf16")(lambda: decode_step(dense, "bf16"))
    section("decode_step_int4")(lambda: decode_step(int4, "native"))
    common = ["--prompt-len", "32", "--gen-len", "128", "--repeats", reps, "--device", "cuda"]
    section("latency_bf16")(lambda: cli_json(["bench", "latency", "--model", dense, "--weights", "bf16",
                                              "--peers", "hf,eager", *common]))
    section("latency_fp32")(lambda: cli_json(["bench", "latency", "--model", dense, "--weights", "fp32",
                                              "--peers", "hf,eager", *common]))
    section("latency_int4")(lambda: cli_json(["bench", "latency", "--model", int4, "--weights", "native",
                                              "--peers", "eager", *common]))
    tp = ["--num-prompts", "64", "--input-len", "128", "--output-len", "128", "--device", "cuda",
          "--max-num-batched-tokens", "8192", "--kv-cache-memory", "4GiB", "--repeats", "2" if args.quick else "3"]
    section("throughput_bf16")(lambda: cli_json(["bench", "throughput", "--model", dense, "--weights", "bf16",
                                                 "--peers", "hf", "--hf-batch", "64", "--hf-dtype", "bfloat16", *tp]))
    section("throughput_int4")(lambda: cli_json(["bench", "throughput", "--model", int4, "--weights", "native",
                                                 "--peers", "none", *tp]))
    section("step_breakdown_bf16")(lambda: step_breakdown(dense, "bf16"))
    with open(os.path.join(args.out, "cuda_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=2)
    print_table()
    return 0


def print_table() -> None:
    r = RESULTS
    print("\n==== summary ====")
    c = r.get("ceilings", {})
    if "error" not in c:
        print(f"{c['gpu']}  torch {c['torch']}  copy {c['copy_bandwidth_GBps']:.0f} GB/s  read "
              f"{c['read_bandwidth_GBps']:.0f} GB/s  bf16 GEMM {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    p = r.get("parity", {})
    if "error" not in p:
        print("parity (max abs err / max |logit| vs HF fp32): " + ", ".join(f"{k} {v:.2e}" for k, v in p.items()))
    for key in ("decode_step_bf16", "decode_step_int4"):
        d = r.get(key, {})
        if "error" not in d:
            print(f"{key}: {d['cuda_kernels_per_step']} kernels/token, eager {d['eager_step_ms']:.2f} ms, graph replay "
                  f"{d['graph_replay_ms']:.3f} ms (call {d['graph_call_ms']:.3f} ms), {d['bytes_per_token'] / 1e6:.0f} MB/token")
    k = r.get("kernels", {})
    if "error" not in k:
        for row in k["rows"]:
            if row["rows"] == 1:
                print(f"  {row['linear']:8s} m=1 {row['kernel']:10s} graph {row['graph_us']:7.1f} us "
                      f"({row['graph_GBps']:6.0f} GB/s)  eager {row['eager_us']:7.1f} us")
    for key in ("latency_bf16", "latency_fp32", "latency_int4"):
        e = r.get(key, {})
        if "error" in e:
            print(f"{key}: FAILED {e['error']}")
            continue
        for name, x in e["result"]["results"].items():
            print(f"{key:13s} {name:11s} decode {x['decode_tokens_per_s']:7.1f} tok/s  prefill "
                  f"{x['prefill_tokens_per_s']:8.0f} tok/s  {100 * x['fraction_of_limit']:5.1f}% of "
                  f"{x['bandwidth_limit_tokens_per_s']:.0f} tok/s")
    for key in ("throughput_bf16", "throughput_int4"):
        e = r.get(key, {})
        if "error" in e:
            print(f"{key}: FAILED {e['error']}")
            continue
        for name, x in e["result"]["results"].items():
            print(f"{key:15s} {name:5s} {x['output_tokens_per_s']:8.0f} output tok/s  "
                  f"{x['total_tokens_per_s']:8.0f} total tok/s  ({x['elapsed_s']:.2f} s; runs "
                  f"{', '.join(f'{v:.0f}' for v in x['total_tokens_per_s_runs'])})")
    b = r.get("step_breakdown_bf16", {})
    if "error" not in b and b:
        print(f"throughput bf16 steps: first (prefill) {b['first_step_ms']:.1f} ms (runner {b['first_step_runner_ms']:.1f}),"
              f" decode median {b['decode_step_ms_median']:.2f} ms (runner {b['decode_runner_ms_median']:.2f}); "
              f"total {b['total_s']:.2f} s, runner {b['runner_total_s']:.2f} s")
    for key, v in r.items():
        if isinstance(v, dict) and "error" in v:
            print(f"ERROR {key}: {v['error']}")


if __name__ == "__main__":
    sys.exit(main())
