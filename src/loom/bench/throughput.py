"""`loom bench throughput`: many requests at once through the engine, against HF static batching.

Workload (bench/workload.py): ``fixed`` is vLLM's "random" dataset (``num_prompts`` prompts of
``input_len`` random token ids, each generating exactly ``output_len`` tokens); ``mixed`` draws
per-request input and output lengths from clipped log-normals (seeded) over prompts of real text.
Either way every request is submitted at time zero and generates exactly its own output length.

loom runs continuous batching over its paged cache. The peer is what HF transformers users do for
offline batches: static batches through ``generate``, swept over batch sizes and dtypes. Requests go
in arrival order; each static batch is left-padded to its longest prompt and runs until its longest
output is done (EOS banned), which is what static batching costs: a request's output tokens are its
own output length only, the tokens its batch generates past that are not counted (nor is padding).
With ``repeats`` > 1 the runs alternate (loom, then every HF configuration, repeated) and the best of
each is kept; the best HF configuration is the one loom is compared with.

KV waste is read every step: allocated slots (used blocks x block size) minus slots holding a
token's K/V, over allocated slots (vLLM reports < 4%: only the last block of each sequence is
partly filled).

Fraction of the compute roof: the workload's FLOPs per token (``workload.workload_flops``: the
analysis module's operator count) x total tokens/s, over the peak matmul FLOP/s measured in the run
for the dtype that engine computed in (``analysis.probe.measure_matmul_flops``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from loom.analysis.probe import measure_matmul_flops, measure_packed_matmul_flops
from loom.bench.workload import (DATASETS, FLOPS_COUNTED, MIXED_INPUT_RANGE, MIXED_OUTPUT_RANGE, Workload,
                                 fixed_workload, mixed_workload, random_prompts, workload_flops)
from loom.config import EngineConfig
from loom.device import synchronize
from loom.llm import LLM
from loom.sampling_params import SamplingParams

__all__ = ["HFStatic", "random_prompts", "run_loom", "run_throughput"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_BATCHES = (8, 16, 32, 64)
HF_DTYPES = ("float32", "bfloat16")


def _output_lens(prompts: Sequence[Sequence[int]], output_len: int | Sequence[int]) -> list[int]:
    """One output length per prompt (an int applies to every prompt)."""
    if isinstance(output_len, int):
        return [output_len] * len(prompts)
    if len(output_len) != len(prompts):
        raise ValueError(f"{len(output_len)} output lengths for {len(prompts)} prompts")
    return list(output_len)


def run_loom(llm: LLM, prompts: list[list[int]], output_len: int | Sequence[int],
             loras: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Every prompt submitted at once, each generating exactly its output length (greedy, EOS banned),
    stepped until all are done (prompt i under adapter ``loras[i]``, when given). ``output_len_mismatches``
    counts requests that generated any other number."""
    engine = llm.engine
    engine.block_manager.reset_prefix_cache()  # a repeat must not find the last run's prompts cached
    outs = _output_lens(prompts, output_len)
    bm, bs = engine.block_manager, engine.kv_cache.block_size
    base_used, base_hits, base_preempt = bm.num_used_blocks, bm.prefix_hits, engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    names = list(loras) if loras is not None else [None] * len(prompts)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        engine.add_request(f"bench-{i}", p, SamplingParams(temperature=0.0, max_tokens=o, min_tokens=o),
                           lora=names[i])
    counts = [0] * len(prompts)
    peak, waste_sum, waste_steps, steps = 0, 0.0, 0, 0
    while engine.has_unfinished_requests():
        for d in engine.step():
            counts[int(d.request_id.rpartition("-")[2])] += len(d.token_ids)
        steps += 1
        used = bm.num_used_blocks - base_used
        peak = max(peak, used)
        if used:
            filled = sum(s.num_computed for s in engine.live_sequences())
            waste_sum += (used * bs - filled) / (used * bs)
            waste_steps += 1
    elapsed = time.perf_counter() - t0
    generated = sum(counts)
    total = sum(len(p) for p in prompts) + generated
    return {"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": total / elapsed, "output_tokens": generated,
            "output_len_mismatches": sum(c != o for c, o in zip(counts, outs)), "steps": steps,
            "peak_kv_blocks": peak, "kv_blocks_total": bm.num_blocks, "block_size": bs,
            "kv_waste_mean": waste_sum / max(waste_steps, 1), "prefix_cache_hits": bm.prefix_hits - base_hits,
            "preemptions": engine.scheduler.num_preemptions - base_preempt}


class HFStatic:
    """HF transformers ``generate`` over static batches of ``batch`` prompts (left-padded), greedy."""

    def __init__(self, folder: str, dtype: torch.dtype, pad_id: int, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(device)
        self.pad_id = pad_id
        self.device = torch.device(device)

    def _generate(self, chunk: list[list[int]], new_tokens: int) -> int:
        """One static batch, left-padded to its longest prompt, ``new_tokens`` generated for every row;
        returns the padded prompt width."""
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
        self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=self.pad_id)
        return width

    def run(self, prompts: list[list[int]], output_len: int | Sequence[int], batch: int) -> dict[str, Any]:
        """Requests in arrival order, ``batch`` at a time; each batch runs until its longest output is done.
        ``output_tokens`` counts each request's own output length; ``generated_tokens`` every row's."""
        outs = _output_lens(prompts, output_len)
        generated, padding = 0, 0
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                chunk, longest = prompts[i:i + batch], max(outs[i:i + batch])
                width = self._generate(chunk, longest)
                generated += longest * len(chunk)
                padding += sum(width - len(p) for p in chunk)
        synchronize(self.device)
        elapsed = time.perf_counter() - t0
        own = sum(outs)
        total = sum(len(p) for p in prompts) + own
        return {"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": own / elapsed,
                "total_tokens_per_s": total / elapsed, "output_tokens": own, "generated_tokens": generated,
                "padding_tokens": padding, "batch": batch}


# the HF sweep ---------------------------------------------------------------------------------------

def resident_bytes() -> int:
    """This process's resident set size (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights occupy: parameters, buffers (the small rotary tables too) and the packed
    tensors of packed linears, each storage counted once (a tied output layer is the embedding)."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    for m in model.modules():
        tensors += [t for t in vars(m).values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_mkldnn:  # opaque: its logical size
            key, size = id(t), t.numel() * t.element_size()
        else:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:500]


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _hf_models(llm: LLM, dtypes: Sequence[str]) -> dict[str, HFStatic | str]:
    """One HF model per dtype (the same checkpoint loom runs), or the error that loading it raised."""
    from loom.bench.peers import hf_reference_copy

    folder = llm.model_path if os.path.isdir(llm.model_path) else hf_reference_copy(llm.model_path)
    pad = llm.tokenizer.eos_token_ids[0] if llm.tokenizer.eos_token_ids else 0
    models: dict[str, HFStatic | str] = {}
    for name in dtypes:
        try:
            models[name] = HFStatic(folder, DTYPES[name], pad, llm.device)
        except Exception as e:  # e.g. out of memory: recorded with every configuration of this dtype
            models[name] = _error(e)
            _free_device_memory(llm.device)
    return models


def _peft_models(llm: LLM, dtypes: Sequence[str], adapters: Sequence[Any], names: Sequence[str]
                 ) -> dict[str, Any]:
    """One HF + PEFT model per dtype holding every adapter (keyed "peft:<dtype>"), or the loading error."""
    from loom.bench.lora import PeftMixedStatic
    from loom.bench.peers import hf_reference_copy

    folder = llm.model_path if os.path.isdir(llm.model_path) else hf_reference_copy(llm.model_path)
    pad = llm.tokenizer.eos_token_ids[0] if llm.tokenizer.eos_token_ids else 0
    models: dict[str, Any] = {}
    for name in dtypes:
        try:
            models[f"peft:{name}"] = PeftMixedStatic(folder, DTYPES[name], pad, [(a.name, a.path) for a in adapters],
                                                     names, llm.device)
        except Exception as e:  # noqa: BLE001 - recorded with every configuration of this dtype
            models[f"peft:{name}"] = _error(e)
            _free_device_memory(llm.device)
    return models


def _run_hf_config(model: HFStatic | str, work: Workload, batch: int) -> dict[str, Any]:
    """One timed pass of one configuration: its figures, or {"error": ...} (not raised)."""
    if isinstance(model, str):
        return {"error": model}
    try:
        return model.run(work.prompts, work.output_lens, batch)
    except Exception as e:  # out of memory and the like: this configuration failed, the sweep goes on
        _free_device_memory(model.device)
        return {"error": _error(e)}


def _hf_summary(batch: int, dtype: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A configuration's entry in ``hf_configs``: its best run, or its first error."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"batch": batch, "dtype": dtype, "error": runs[0]["error"] if runs else "not run"}
    best = max(ok, key=lambda r: r["total_tokens_per_s"])
    return {**best, "batch": batch, "dtype": dtype, "total_tokens_per_s_runs": [r["total_tokens_per_s"] for r in ok]}


# the compute roof -----------------------------------------------------------------------------------

def measure_peaks(dtypes: Sequence[str], device: torch.device, size: int | None = None) -> dict[str, Any]:
    """Peak matmul FLOP/s of each dtype on ``device`` (square matmuls of ``size``: 1024 on the CPU, where
    that measures compute rather than DRAM, 8192 on a GPU). On the CPU the better of a plain ``torch.mm``
    and the product with the weight pre-packed by oneDNN (what loom's bf16 and int8 linears run); "int8"
    (W8A8) has only the packed form."""
    size = size or (8192 if device.type == "cuda" else 1024)
    peaks = {}
    for name in dict.fromkeys(dtypes):
        plain = measure_matmul_flops(size, DTYPES[name], repeats=5, device=device) if name in DTYPES else 0.0
        packed = 0.0
        if device.type == "cpu" and torch.backends.mkldnn.is_available() and name in ("bfloat16", "int8"):
            packed = measure_packed_matmul_flops(size, name, repeats=5)
        peaks[name] = max(plain, packed)
    return {"peak_matmul_flops": peaks, "matmul_size": size,
            "peak_measured_with": "max(torch.mm, oneDNN pre-packed weight) per dtype on the CPU"}


def _with_roof(entry: dict[str, Any], dtype: str, flops_per_token: float, peaks: dict[str, float]) -> dict[str, Any]:
    """``entry`` with its fraction of the compute roof (flops_per_token x total tokens/s / the dtype's peak)."""
    if "error" in entry:
        return entry
    return {**entry, "dtype": dtype,
            "fraction_of_compute_roof": flops_per_token * entry["total_tokens_per_s"] / peaks[dtype]}


# the benchmark --------------------------------------------------------------------------------------

def _workload(llm: LLM, dataset: str, num_prompts: int, input_len: int, output_len: int, seed: int,
              input_range: tuple[int, int], output_range: tuple[int, int]) -> Workload:
    if dataset == "fixed":
        tok = llm.tokenizer
        special = tuple(tok.eos_token_ids) + ((tok.bos_token_id,) if tok.bos_token_id is not None else ())
        work = fixed_workload(num_prompts, input_len, output_len, llm.config.vocab_size, seed, special)
    else:
        work = mixed_workload(num_prompts, llm.tokenizer, seed, input_range, output_range)
    longest = max(len(p) + o for p, o in zip(work.prompts, work.output_lens))
    if longest > llm.engine.max_model_len:
        raise ValueError(f"the longest request needs {longest} tokens of context; the engine holds "
                         f"{llm.engine.max_model_len} (shorten the lengths or enlarge --kv-cache-memory)")
    return work


def _check(dataset: str, peers: Sequence[str], num_prompts: int, input_len: int, output_len: int,
           repeats: int, hf_batch: Sequence[int], hf_dtype: Sequence[str]) -> None:
    if min(num_prompts, input_len, output_len, repeats) < 1:
        raise ValueError("--num-prompts, --input-len, --output-len and --repeats must be at least 1")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (available: {', '.join(DATASETS)})")
    unknown = set(peers) - {"hf", "peft"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)} (available: hf, and peft with --loras)")
    if "hf" in peers and (not hf_batch or min(hf_batch) < 1):
        raise ValueError("--hf-batch needs batch sizes of at least 1")
    bad = set(hf_dtype) - set(DTYPES)
    if "hf" in peers and (bad or not hf_dtype):
        raise ValueError(f"--hf-dtype takes {', '.join(DTYPES)}; got {', '.join(hf_dtype) or 'none'}")


def _timed_runs(llm: LLM, work: Workload, models: dict[str, HFStatic | str], configs: list[tuple[int, str]],
                repeats: int, warmup: bool, loras: Sequence[str | None] | None = None
                ) -> tuple[list[dict[str, Any]], dict[tuple[int, str], list], list[dict[str, Any]]]:
    """loom's runs, every HF configuration's and (with ``loras``) loom's under the adapters, alternating:
    loom, loom with adapters, every configuration, repeated."""
    if warmup:
        run_loom(llm, work.prompts, work.output_lens)
        for batch, dtype in configs:
            _run_hf_config(models[dtype], Workload(work.prompts[:batch], work.output_lens[:batch]), batch)
    loom_runs: list[dict[str, Any]] = []
    lora_runs: list[dict[str, Any]] = []
    hf_runs: dict[tuple[int, str], list[dict[str, Any]]] = {c: [] for c in configs}
    for _ in range(repeats):  # alternate, so a drifting machine slows all alike
        loom_runs.append(run_loom(llm, work.prompts, work.output_lens))
        if loras is not None:
            lora_runs.append(run_loom(llm, work.prompts, work.output_lens, loras))
        for batch, dtype in configs:
            if not any("error" in r for r in hf_runs[(batch, dtype)]):  # a failed configuration is not retried
                hf_runs[(batch, dtype)].append(_run_hf_config(models[dtype], work, batch))
    return loom_runs, hf_runs, lora_runs


def _loom_result(llm: LLM, runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(runs, key=lambda r: r["total_tokens_per_s"])
    sched = llm.engine.scheduler_config
    return {**best, "total_tokens_per_s_runs": [r["total_tokens_per_s"] for r in runs],
            "kv_cache": llm.engine.describe(), "decode_steps": llm.engine.runner.describe_steps(),
            "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens}


def _compare(results: dict[str, Any], hf_configs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Put the best working HF configuration in ``results["hf"]``; loom's figures over it."""
    ok = [c for c in hf_configs if "error" not in c]
    if not ok:
        return None
    results["hf"] = max(ok, key=lambda c: c["total_tokens_per_s"])
    return {k: results["loom"][k] / results["hf"][k] for k in ("total_tokens_per_s", "output_tokens_per_s",
                                                                 "requests_per_s")}


def run_throughput(engine: EngineConfig | None = None, *, dataset: str = "fixed", num_prompts: int = 64,
                   input_len: int = 128, output_len: int = 128, input_range: tuple[int, int] = MIXED_INPUT_RANGE,
                   output_range: tuple[int, int] = MIXED_OUTPUT_RANGE, peers: tuple[str, ...] = ("hf",),
                   hf_batch: int | Sequence[int] = HF_BATCHES, hf_dtype: Sequence[str] = HF_DTYPES, seed: int = 0,
                   repeats: int = 1, warmup: bool | None = None, peak_matmul_size: int | None = None,
                   loras: int = 0, lora_rank: int = 16, lora_dtype: str = "auto",
                   lora_targets: Sequence[str] | None = None) -> dict[str, Any]:
    """loom (built from ``engine``: model, weights, device, cache, scheduler, KV policy, RoPE scaling, decode
    step) against HF static batching (every batch size of ``hf_batch`` x every dtype of ``hf_dtype``) on the
    same requests. ``dataset``: fixed (``input_len`` / ``output_len``) or mixed (lengths drawn within
    ``input_range`` / ``output_range``, from ``seed``). ``warmup``: one untimed run of each first (default:
    on CUDA only, where it captures loom's decode graphs and loads the GPU libraries). A KV policy bounds
    loom's requests' memory (eviction), the peers keep their full caches; a RoPE override changes loom's
    model only (the HF peer runs the file as it is). ``loras`` > 0: also the same requests spread over that
    many random adapters of rank ``lora_rank`` on ``lora_targets`` (default: every projection; slots in
    ``lora_dtype``), and batch-1
    decode with and without one (bench/lora.py), reported under ``results["loom_lora"]``."""
    engine = engine or EngineConfig()
    batches = [hf_batch] if isinstance(hf_batch, int) else list(hf_batch)
    _check(dataset, peers, num_prompts, input_len, output_len, repeats, batches, hf_dtype)
    if loras < 0 or lora_rank < 1:
        raise ValueError("--loras must be >= 0 and --lora-rank >= 1")
    if "peft" in peers and not loras:
        raise ValueError("the peft peer serves adapters: give --loras K")
    rss_before = resident_bytes()
    if loras:
        import dataclasses

        from loom.config import LoraServingConfig

        engine = dataclasses.replace(engine, lora_serving=LoraServingConfig(max_loras=loras, max_lora_rank=lora_rank,
                                                                            dtype=lora_dtype))
    llm = LLM(config=engine)
    adapter_dir = None
    if loras:
        import tempfile

        from loom.bench.lora import PROJECTIONS, write_random_adapters

        targets = tuple(lora_targets or PROJECTIONS)
        unknown = set(targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"--lora-targets takes {', '.join(PROJECTIONS)}; got {', '.join(sorted(unknown))}")
        adapter_dir = tempfile.TemporaryDirectory(prefix="loom-bench-lora-")
        for name, folder in write_random_adapters(llm.config, adapter_dir.name, loras, lora_rank, targets):
            llm.add_lora(name, folder)
    memory = {"rss_before_load_mib": rss_before / 2**20, "rss_after_load_mib": resident_bytes() / 2**20,
              "weight_mib": weight_bytes(llm.model) / 2**20}
    # the dtype the GEMMs run in, whose peak is the roof (int8 weights: W8A8 GEMMs, bf16 elsewhere)
    dtype = "int8" if engine.weights == "int8" else str(llm.model.dtype).replace("torch.", "")
    work = _workload(llm, dataset, num_prompts, input_len, output_len, seed, input_range, output_range)
    dtypes = list(dict.fromkeys(hf_dtype)) if "hf" in peers else []
    configs = [(b, d) for d in dtypes for b in batches]
    models = _hf_models(llm, dtypes) if configs else {}
    names = [f"lora-{i % loras}" for i in range(len(work.prompts))] if loras else None
    peft_dtypes = list(dict.fromkeys(hf_dtype)) if "peft" in peers else []
    if peft_dtypes:  # keyed "peft:<dtype>" beside HF's in the alternating sweep
        models.update(_peft_models(llm, peft_dtypes, llm.engine.list_loras(), names))  # type: ignore[arg-type]
        configs += [(b, f"peft:{d}") for d in peft_dtypes for b in batches]
    roof = measure_peaks([dtype, *dtypes, *peft_dtypes], llm.device, peak_matmul_size)
    flops = workload_flops(llm.config, [len(p) for p in work.prompts], work.output_lens)
    per_token = flops / (work.input_tokens + work.output_tokens)
    roof = {"flops_per_token": per_token, "workload_flops": flops, "flops_counted": FLOPS_COUNTED,
            "fraction_of_compute_roof": "flops_per_token x total_tokens_per_s / peak_matmul_flops[dtype]", **roof}
    loom_runs, hf_runs, lora_runs = _timed_runs(llm, work, models, configs, repeats,
                                                warmup if warmup is not None else llm.device.type == "cuda", names)
    peaks = roof["peak_matmul_flops"]
    results: dict[str, Any] = {"loom": {**_with_roof(_loom_result(llm, loom_runs), dtype, per_token, peaks),
                                        "memory": memory, "weights": engine.weights or "native"}}
    peft_configs = [_with_roof(_hf_summary(b, d, hf_runs[(b, d)]), d.removeprefix("peft:"), per_token, peaks)
                    for b, d in configs if d.startswith("peft:")]
    configs = [(b, d) for b, d in configs if not d.startswith("peft:")]
    if loras:
        from loom.bench.lora import batch1_decode, summarize

        results["loom_lora"] = summarize(loom_runs, lora_runs, loras, lora_rank, llm.config, per_token, targets)
        results["loom_lora"]["slot_dtype"] = str(llm.engine.adapters.dtype).replace("torch.", "")
        results["loom_lora"]["peft_configs"] = peft_configs
        ok = [c for c in peft_configs if "error" not in c]
        if ok:
            best = max(ok, key=lambda c: c["total_tokens_per_s"])
            results["loom_lora"]["peft"] = best
            results["loom_lora"]["mixed_over_peft"] = (results["loom_lora"]["mixed"]["total_tokens_per_s"]
                                                       / best["total_tokens_per_s"])
        results["loom_lora"]["batch1"] = batch1_decode(llm, "lora-0", work.prompts[0][:32], 256, max(repeats, 5))
        adapter_dir.cleanup()  # type: ignore[union-attr]
    hf_configs = [_with_roof(_hf_summary(b, d, hf_runs[(b, d)]), d, per_token, peaks) for b, d in configs]
    ratio = _compare(results, hf_configs)
    fixed = dataset == "fixed"
    return {"benchmark": "throughput", "model": engine.model or "default", "dataset": dataset, "seed": seed,
            "num_prompts": num_prompts, "input_len": input_len if fixed else None,
            "output_len": output_len if fixed else None,
            "workload": {**work.description, "input_tokens": work.input_tokens, "output_tokens": work.output_tokens},
            "dtype": dtype, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
            "repeats": repeats, "compute_roof": roof, "results": results, "hf_configs": hf_configs,
            "loom_over_hf": ratio, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
