"""`loom bench offload`: generating under a memory budget, weights streamed from storage (seed 002).

At each budget (the share of the decoder layers' weights that stays resident: 100%, 75%, 50%, 25% by
default), with and without speculative decoding, loom generates one greedy completion in a process of its
own (bench/isolated.py) and reports:

    tokens_per_s              generated tokens / wall seconds of the request (prefill included)
    bytes_read_per_token      bytes the layer stream read from storage / generated tokens
    storage_read_per_token    the process's bytes fetched from storage (/proc/self/io read_bytes) / token
    per_token_s               seconds per token the layer stream spent reading, filling slots in place,
                              building layers anew (reader thread), computing streamed layers and
                              waiting for one (the forward)
    peak_rss                  the process's peak resident memory while generating (VmHWM, reset after
                              loading), checked against the budget plus the named overheads (``overheads``):
                              runtime (resident before loading: interpreter, torch, loom), tokenizer,
                              load residue and first generation, the last two measured in the probe
                              process (everything resident, the same prompt): what loading leaves beyond the
                              plan (heap fragments; ~0 since the LLM collects and trims after loading) and
                              what a process's first generation adds, once (code pages first touched,
                              first-run allocations, the prefill's activations: a second generation adds
                              < 2 MB); ``peak_over_budget_and_overheads``
                              is the excess (<= 0 when within), ``generation_rss`` the row's own growth split
                              into anonymous and file-backed pages
    floor_s_per_token         the plan's streamed bytes per forward / the measured storage read bandwidth
    seed_floor_s_per_token    seed 002's (model + KV - memory) / bandwidth (analysis/offload.py)

The storage read bandwidth is measured on the model file itself with the reads the stream makes (O_DIRECT,
or pread + posix_fadvise(DONTNEED)). Speculation: the streamed target verifies k + 1 tokens per pass, so
each pass's read serves up to k + 1 tokens. Unless the user gives k, it is chosen per budget by
analysis/offload.py's choose_speculative_tokens: the acceptance and the draft step's seconds are measured on
a short warm-up with everything resident (k = PRIOR_K), the pass's read from the plan's streamed bytes and
the measured bandwidth. Each row reports the choice (``speculation``) and, measured, the acceptance and the
tokens per target pass next to the formula's (1 - a^(k+1)) / (1 - a) at the chosen k and measured a. The peer is HF accelerate's disk offload (``device_map="auto"``,
``max_memory={"cpu": budget}``, an offload folder) at the same budget, on the fp32 HF copy of the model, in
its own process too; it reads through the page cache (memory-mapped), which is dropped for the model's
files before each run so that its first pass reads from storage as well.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Any, Sequence

from loom.bench.isolated import IsolatedPeer
from loom.weights.loader import release_freed_memory

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
METHODS = ("none", "ngram")
PRIOR_K = 3  # the warm-up's k, from which the acceptance and the draft step's seconds are measured
COPY_PROMPT = ("Repeat the following list exactly, twice: alpha, beta, gamma, delta, epsilon, zeta, eta, theta, "
               "iota, kappa, lambda, mu.\n\nalpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa,")


# process measurements (Linux /proc) ------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def rss_parts() -> dict[str, int]:
    """Resident bytes by kind: anonymous (heap, tensors), file-backed (code, mapped files), shared memory."""
    return {"anon": _status_bytes("RssAnon"), "file": _status_bytes("RssFile"), "shmem": _status_bytes("RssShmem")}


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Restart VmHWM from the current resident size (Linux: 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def storage_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io read_bytes), all threads."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def drop_page_cache(paths: Sequence[str]) -> None:
    """posix_fadvise(DONTNEED) on every file under ``paths`` (files or folders)."""
    for root in paths:
        files = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns]
        for name in files:
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def storage_bandwidth(path: str, nbytes: int = 256 << 20, chunk: int = 8 << 20) -> dict[str, Any]:
    """Sequential read bandwidth of ``path``'s storage, read as the layer stream reads (O_DIRECT, or pread +
    DONTNEED): up to ``nbytes`` of the file in ``chunk``-byte reads."""
    from loom.weights.streaming import Span, StorageReader

    reader = StorageReader([path])
    try:
        size = os.path.getsize(path)
        total = min(nbytes, size)
        buf = mmap.mmap(-1, chunk + 4096)
        t0 = time.perf_counter()
        for offset in range(0, total, chunk):
            reader.read(Span(path, offset, min(chunk, total - offset), ()), buf, 0)
        seconds = time.perf_counter() - t0
        return {"bytes_per_s": reader.bytes_read / seconds, "bytes": reader.bytes_read, "seconds": seconds,
                "mode": reader.mode}
    finally:
        reader.close()


# the runs, each in its own process ----------------------------------------------------------------

class LoomUnderBudget:
    """loom's LLM under ``budget`` bytes (None: no budget), built in an isolated process."""

    def __init__(self, model: str, budget: int | None, kv_bytes: int, buffers: int = 2,
                 speculative: dict[str, Any] | None = None, weights: str | None = None) -> None:
        from loom import LLM
        from loom.config import CacheConfig, SpeculativeConfig
        from loom.default_model import resolve_model
        from loom.tokenizer import load_tokenizer
        from loom.weights.gguf import GGUFFile

        self.baseline_rss = rss_bytes()  # the runtime: interpreter, torch, loom
        path = resolve_model(model)
        g = GGUFFile(path) if os.path.isfile(path) else None
        tokenizer = load_tokenizer(path, None if g is None else g.metadata, ())
        if g is not None:
            g.close()
        # the tokenizer (and the GGUF metadata it is built from): a fixed overhead beside the budget, measured on a
        # copy built here (the LLM builds its own)
        self.tokenizer_rss = rss_bytes() - self.baseline_rss
        del tokenizer, g
        release_freed_memory()
        spec = SpeculativeConfig(**speculative) if speculative else None
        self.llm = LLM(model, memory_budget=budget, cache=CacheConfig(memory_bytes=kv_bytes), stream_buffers=buffers,
                       speculative=spec, weights=weights, decode_step="module")
        self.load_peak_rss = peak_rss_bytes()
        self.rss_after_load = rss_bytes()

    def run(self, prompt: str, gen_len: int) -> dict[str, Any]:
        from loom import SamplingParams

        llm = self.llm
        offload = llm.offload
        result: dict[str, Any] = {"plan": offload.plan.to_dict() if offload else None,
                                  "describe": llm.engine.describe(), "baseline_rss": self.baseline_rss,
                                  "tokenizer_rss": self.tokenizer_rss, "load_peak_rss": self.load_peak_rss,
                                  "rss_after_load": self.rss_after_load}
        ids = llm.encode(prompt)
        result["prompt_ids"] = ids
        if gen_len == 0:
            return result
        before = dict(offload.stats()) if offload else {}
        io0 = storage_read_bytes()
        parts0 = rss_parts()
        reset_peak_rss()
        t0 = time.perf_counter()
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True))[0]
        seconds = time.perf_counter() - t0
        parts1 = rss_parts()
        n = len(out.token_ids)
        after = offload.stats() if offload else {}
        spec = llm.engine.speculator
        result.update(
            tokens=n, seconds=seconds, tokens_per_s=n / seconds, token_ids=out.token_ids,
            prefill_s=out.timings.prefill, decode_tokens_per_s=out.timings.decode_tokens_per_s,
            bytes_read_per_token=(after.get("bytes_read", 0) - before.get("bytes_read", 0)) / n,
            storage_read_per_token=(storage_read_bytes() - io0) / n,
            wait_seconds=after.get("wait_seconds", 0) - before.get("wait_seconds", 0),
            peak_rss=peak_rss_bytes(), speculative=None if spec is None else spec.stats.as_dict(),
            num_speculative_tokens=None if spec is None else spec.config.num_tokens)
        # where a token's time goes: the reader thread reads and fills slots (builds only a slot's first layer or
        # one of another structure) while the forward computes the streamed layers or waits for one
        result["per_token_s"] = {key: (after.get(f"{key}_seconds", 0) - before.get(f"{key}_seconds", 0)) / n
                                 for key in ("read", "fill", "build", "compute", "wait")}
        planned = offload.plan.planned_bytes if offload else 0
        result["load_residue"] = self.rss_after_load - self.baseline_rss - self.tokenizer_rss - planned
        result["generation_rss"] = {"peak_over_after_load": result["peak_rss"] - self.rss_after_load,
                                    **{f"{k}_after": parts1[k] - parts0[k] for k in parts0}}
        return result


class AccelerateDiskOffload:
    """HF transformers + accelerate's big-model inference: the modules that do not fit ``max_memory`` on the CPU
    are offloaded to disk (``offload_folder``) and loaded onto the CPU as each runs."""

    def __init__(self, hf_folder: str, budget: int, offload_folder: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.folders = [hf_folder, offload_folder]
        self.baseline_rss = rss_bytes()
        self.model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, device_map="auto",
                                                          max_memory={"cpu": budget}, offload_folder=offload_folder)
        self.model.eval()
        self.load_peak_rss = peak_rss_bytes()
        self.device_map = {k: str(v) for k, v in getattr(self.model, "hf_device_map", {}).items()}

    def run(self, prompt_ids: list[int], gen_len: int) -> dict[str, Any]:
        import torch

        drop_page_cache(self.folders)
        ids = torch.tensor([prompt_ids])
        io0 = storage_read_bytes()
        reset_peak_rss()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                                      pad_token_id=self.model.config.eos_token_id)
        seconds = time.perf_counter() - t0
        n = out.shape[1] - len(prompt_ids)
        disk = sorted(k for k, v in self.device_map.items() if v == "disk")
        return {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
                "token_ids": out[0, len(prompt_ids):].tolist(),
                "storage_read_per_token": (storage_read_bytes() - io0) / n, "peak_rss": peak_rss_bytes(),
                "baseline_rss": self.baseline_rss, "load_peak_rss": self.load_peak_rss,
                "modules_on_disk": len(disk), "modules": len(self.device_map)}


# the sweep -----------------------------------------------------------------------------------------

def _spec(method: str, k: int, model: str, draft_model: str | None) -> dict[str, Any] | None:
    if method == "none":
        return None
    if method == "draft":
        return {"method": "draft", "num_tokens": k, "draft_model": draft_model or model, "draft_weights": "native"}
    return {"method": method, "num_tokens": k}


def _warmup_speculation(row: dict[str, Any]) -> dict[str, Any]:
    """From a warm-up run (everything resident): the acceptance (the censored-geometric estimate from a prior),
    seconds per drafted token and the target's compute seconds per pass."""
    from loom.analysis.offload import acceptance_estimate

    stats = row["speculative"]
    passes = max(1, stats["passes"])
    draft_step_s = stats["draft_seconds"] / max(1, stats["draft_tokens"])
    compute_s = max(0.0, (row["seconds"] - row["prefill_s"] - stats["draft_seconds"]) / passes)
    return {"acceptance": acceptance_estimate(stats["accepted_tokens"], stats["rejections"]),
            "draft_step_s": draft_step_s, "target_compute_s": compute_s, "warmup_tokens": row["tokens"],
            "warmup_passes": stats["passes"], "warmup_k": PRIOR_K}


def _plan_at(plan: dict[str, Any], budget: int) -> dict[str, Any]:
    """The plan a run under ``budget`` makes (engine/budget.py), from the sizes a probe measured."""
    from loom.engine.budget import plan_residency

    return plan_residency(budget, plan["base_bytes"], plan["layer_bytes"], plan["layer_file_bytes"],
                          plan["kv_cache_bytes"], plan["draft_bytes"], plan["buffers"],
                          plan["read_buffer_bytes"]).to_dict()


def _speculation_report(row: dict[str, Any], k: int) -> dict[str, Any]:
    """Measured acceptance and tokens per target pass against (1 - a^(k+1)) / (1 - a) at that acceptance."""
    from loom.analysis.speculative import expected_tokens

    stats = row.get("speculative") or {}
    if not stats.get("passes"):
        return {}
    a = stats["acceptance_rate"]
    return {"measured_acceptance": a, "tokens_per_pass": stats["tokens_per_pass"],
            "formula_tokens_per_pass": expected_tokens(k, a),
            "formula_tokens_per_pass_by_pass_k": stats["expected_tokens_per_pass"]}


def _check_peak(row: dict[str, Any], probed: dict[str, Any]) -> None:
    """The row's peak RSS against its budget plus the named overheads: runtime and tokenizer (its own process),
    load residue and first generation (the probe's, everything resident: the same model, prompt and code)."""
    overheads = {"runtime": row["baseline_rss"], "tokenizer": row["tokenizer_rss"],
                 "load_residue": max(0, probed["load_residue"]),
                 "first_generation": probed["generation_rss"]["peak_over_after_load"]}
    allowed = row["budget"] + sum(overheads.values())
    row["overheads"] = overheads
    row["peak_over_budget_and_overheads"] = row["peak_rss"] - allowed
    row["peak_within_budget_and_overheads"] = row["peak_rss"] <= allowed


def budget_for(plan: dict[str, Any], fraction: float) -> int:
    """The budget at which ``fraction`` of the decoder layers' bytes can stay resident: everything when 1, else
    the smallest workable set (every layer streamed) plus that share of the layers."""
    if fraction >= 1:
        return int(plan["planned_bytes"])
    return int(plan["minimum_bytes"] + fraction * sum(plan["layer_bytes"]))


def run_offload(model: str | None = None, *, fractions: Sequence[float] = FRACTIONS,
                methods: Sequence[str] = METHODS, num_tokens: int | None = None, draft_model: str | None = None,
                gen_len: int = 32, prompt: str = COPY_PROMPT, kv_bytes: int = 16 << 20, buffers: int = 2,
                weights: str | None = None, peers: Sequence[str] = ("accelerate",),
                hf_folder: str | None = None, bandwidth_bytes: int = 256 << 20,
                warmup_len: int = 16) -> dict[str, Any]:
    """The sweep of the module doc. ``num_tokens``: k, or None to choose it per budget from a warm-up of
    ``warmup_len`` tokens. ``hf_folder``: the HF copy accelerate runs (default: the model itself when it is a
    folder, else transformers' fp32 copy of the GGUF, bench/peers.py)."""
    from loom.analysis.offload import choose_speculative_tokens, offload_limit
    from loom.default_model import resolve_model

    path = resolve_model(model) if model else resolve_model(None)
    bandwidth = storage_bandwidth(path if os.path.isfile(path) else _largest_file(path), bandwidth_bytes)
    bw = bandwidth["bytes_per_s"]
    model_file_bytes = _weights_file_bytes(path)
    rows: list[dict[str, Any]] = []
    plans: dict[str, dict[str, Any]] = {}
    for method in methods:
        auto = method != "none" and num_tokens is None
        spec = _spec(method, PRIOR_K if num_tokens is None else num_tokens, path, draft_model)
        probe = IsolatedPeer(LoomUnderBudget, path, 10**15, kv_bytes, buffers, spec, weights)
        try:
            probed = probe.call(prompt, warmup_len)  # also measures the load residue and generation overheads
            plans[method], prompt_ids = probed["plan"], probed["prompt_ids"]
        finally:
            probe.close()
        warm = _warmup_speculation(probed) if auto else None
        for fraction in fractions:
            budget = budget_for(plans[method], fraction)
            row: dict[str, Any] = {"system": "loom", "method": method, "fraction": fraction, "budget": budget}
            k = num_tokens
            if warm is not None:
                streamed = _plan_at(plans[method], budget)["streamed_bytes_per_forward"]
                choice = choose_speculative_tokens(streamed, bw, warm["acceptance"], warm["draft_step_s"],
                                                   warm["target_compute_s"])
                k = choice.k
                row["speculation"] = {"k": k, "chosen_by": "formula", "choice": choice.to_dict(), "warmup": warm}
                spec = _spec(method, k, path, draft_model)
            elif method != "none":
                row["speculation"] = {"k": k, "chosen_by": "user"}
            row.update(IsolatedPeer.call_once(LoomUnderBudget, (path, budget, kv_bytes, buffers, spec, weights),
                                              (prompt, gen_len)))
            if method != "none" and "error" not in row:
                row["speculation"].update(_speculation_report(row, k))
            if "error" not in row:
                _check_peak(row, probed)
            plan = row.get("plan") or plans[method]
            row["floor_s_per_token"] = plan["streamed_bytes_per_forward"] / bw
            row["seed_floor_s_per_token"] = offload_limit(model_file_bytes, budget, bw,
                                                          kv_cache_bytes=plan["kv_cache_bytes"]).latency_s
            rows.append(row)
    if "accelerate" in peers:
        rows += _accelerate_rows(path, hf_folder, fractions, plans[methods[0]], prompt_ids, gen_len, bw)
    return {"model": path, "storage": bandwidth, "model_file_bytes": model_file_bytes, "gen_len": gen_len,
            "kv_cache_bytes": kv_bytes, "buffers": buffers, "num_speculative_tokens": num_tokens, "rows": rows}


def _accelerate_rows(path: str, hf_folder: str | None, fractions: Sequence[float], plan: dict[str, Any],
                     ids: list[int], gen_len: int, bw: float) -> list[dict[str, Any]]:
    from loom.analysis.offload import offload_limit

    if hf_folder is None:
        if os.path.isdir(path):
            hf_folder = path
        else:
            from loom.bench.peers import hf_reference_copy

            hf_folder = hf_reference_copy(path)
    hf_bytes = _weights_file_bytes(hf_folder)
    rows = []
    for fraction in fractions:
        budget = budget_for(plan, fraction)
        row: dict[str, Any] = {"system": "accelerate", "method": "none", "fraction": fraction, "budget": budget,
                               "weights_file_bytes": hf_bytes}
        with tempfile.TemporaryDirectory(prefix="loom-offload-") as folder:
            row.update(IsolatedPeer.call_once(AccelerateDiskOffload, (hf_folder, budget, folder), (ids, gen_len)))
        row["seed_floor_s_per_token"] = offload_limit(hf_bytes, budget, bw).latency_s
        rows.append(row)
    return rows


def _weights_file_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def _largest_file(folder: str) -> str:
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    return os.path.join(folder, max(names, key=lambda n: os.path.getsize(os.path.join(folder, n))))


def plot_offload(result: dict[str, Any], path: str) -> None:
    """Tokens/s against the share of the layers resident: loom with each method, accelerate, and the floor's
    ceiling (1 / floor seconds per token) from the measured storage bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[float, float]]] = {}
    ceiling: list[tuple[float, float]] = []
    for row in result["rows"]:
        if "tokens_per_s" not in row:
            continue
        name = row["system"] + ("" if row["method"] == "none" else f" + {row['method']}")
        series.setdefault(name, []).append((row["fraction"], row["tokens_per_s"]))
        if row["system"] == "loom" and row["method"] == "none" and row.get("floor_s_per_token"):
            ceiling.append((row["fraction"], 1 / row["floor_s_per_token"]))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] * 100 for p in points], [p[1] for p in points], marker="o", label=name)
    if ceiling:
        ceiling.sort()
        ax.plot([p[0] * 100 for p in ceiling], [p[1] for p in ceiling], "k--", label="storage floor (no speculation)")
    ax.set_xlabel("decoder layer weights resident (%)")
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    bw = result["storage"]["bytes_per_s"] / 1e9
    ax.set_title(f"{os.path.basename(result['model'])}: storage {bw:.2f} GB/s ({result['storage']['mode']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
