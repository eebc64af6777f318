"""`loom bench latency`: batch-1 prefill and decode speed of loom and its peers, from one run.

Engines are loaded side by side and run in turns (loom, HF, loom, HF, ...), keeping each one's best
run, so a noisy machine slows both alike. Every figure is read against the machine's limit: decode
moves (weights + KV) bytes per token, so tokens/s can be at most measured bandwidth / bytes per token.
The llama.cpp peer runs in a process of its own (bench/isolated.py): when it crashes, its result is
the error and the rest of the benchmark completes.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Sequence

import torch

from loom.analysis.hardware import measure_device_bandwidth, measure_memory_bandwidth
from loom.analysis.runs import LatencySample, benchmark_prompt_ids, loom_runner
from loom.analysis.traffic import decode_bytes_per_token, dense_weight_bytes_per_token
from loom.bench.isolated import IsolatedPeer, PeerFailed
from loom.llm import LLM
from loom.sampling_params import StructuredOutput

# eager: loom itself with the module step (no compiled decode step); scripted: loom with the TorchScript
# step instead of the native one (where the native step takes the model). See engine/step/.
PEERS = ("hf", "llamacpp", "eager", "scripted")


def _weights_label(llm: LLM) -> str:
    """How loom holds the model's linears, e.g. "native: 120 x int4 g32, 1 x int8 g32; rest fp32"."""
    from collections import Counter

    from loom.layers.quantized import QuantizedLinear, W8A8Linear

    kinds: Counter[str] = Counter()
    for m in llm.model.modules():
        if isinstance(m, QuantizedLinear):
            kinds[f"int{m.bits} g{m.group_size} ({m.backend})"] += 1
        elif isinstance(m, W8A8Linear):
            kinds["w8a8"] += 1
    dense = str(llm.model.dtype).replace("torch.", "")
    if not kinds:
        return dense
    return "native: " + ", ".join(f"{n} x {k}" for k, n in kinds.items()) + f"; rest {dense}"


def _summary(samples: list[LatencySample], prompt_len: int, bytes_per_token: float,
             bandwidth: float) -> dict[str, float]:
    best_decode = max(s.decode_tokens_per_s for s in samples)
    best_prefill = min(s.prefill_s for s in samples)
    roof = bandwidth / bytes_per_token
    return {"prefill_s": best_prefill, "prefill_tokens_per_s": prompt_len / best_prefill,
            "decode_tokens_per_s": best_decode, "decode_tokens_per_s_runs": [s.decode_tokens_per_s for s in samples],
            "bytes_per_token": bytes_per_token, "bandwidth_limit_tokens_per_s": roof,
            "fraction_of_limit": best_decode / roof}


Runner = Callable[[list[int], int], LatencySample]


def _check(batch: int, prompt_len: int, gen_len: int, repeats: int, peers: Sequence[str]) -> None:
    if batch != 1:
        raise ValueError("bench latency measures batch 1")
    if gen_len < 2:
        raise ValueError("--gen-len must be at least 2 to measure decoding")
    if prompt_len < 1 or repeats < 1:
        raise ValueError("--prompt-len and --repeats must be at least 1")
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)} (available: {', '.join(PEERS)})")


def _llamacpp(llm: LLM) -> IsolatedPeer:
    """llama.cpp on loom's GGUF, in its own process (a crash there is the peer's error, not the benchmark's)."""
    from loom.bench import peers as peer_module

    if not llm.model_path.endswith(".gguf"):
        raise ValueError("the llamacpp peer runs GGUF files; --model must be one")
    if llm.device.type != "cpu":
        raise ValueError("the llamacpp peer runs on the CPU; use --device cpu")
    return IsolatedPeer(peer_module.LlamaCppGenerate, llm.model_path, torch.get_num_threads())


def _runners(llm: LLM, peers: Sequence[str], dtype: str
             ) -> tuple[dict[str, Runner], dict[str, str], list[IsolatedPeer]]:
    """The engines to time by name, the peers that failed to start (name -> error), and the isolated
    peers to close at the end."""
    runners: dict[str, Runner] = {"loom": loom_runner(llm)}
    errors: dict[str, str] = {}
    isolated: list[IsolatedPeer] = []
    if "eager" in peers:
        runners["loom-eager"] = loom_runner(llm, "module")
    if "scripted" in peers and llm.engine.runner.steps[0].name == "native":
        runners["loom-scripted"] = loom_runner(llm, "scripted")
    if "hf" in peers:
        from loom.bench.peers import HFGenerate, hf_reference_copy

        folder = llm.model_path if os.path.isdir(llm.model_path) else hf_reference_copy(llm.model_path)
        hf_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        runners["hf"] = HFGenerate(folder, hf_dtype, llm.device).run
    if "llamacpp" in peers:
        try:
            isolated.append(_llamacpp(llm))
            runners["llamacpp"] = isolated[-1].run
        except PeerFailed as e:
            errors["llamacpp"] = str(e)
    return runners, errors, isolated


def _time_runners(llm: LLM, runners: dict[str, Runner], errors: dict[str, str], prompt_ids: list[int],
                  gen_len: int, repeats: int) -> tuple[dict[str, list[LatencySample]], dict[str, str | None]]:
    """Warm every runner, then time them in turns; an isolated peer that fails moves to ``errors``.
    Returns each runner's samples and the decode step each loom runner's decodes went through."""
    samples: dict[str, list[LatencySample]] = {name: [] for name in runners}
    ran: dict[str, str | None] = {}

    def attempt(name: str, ids: list[int], n: int) -> LatencySample | None:
        try:
            return runners[name](ids, n)
        except PeerFailed as e:
            errors[name] = str(e)
            del runners[name], samples[name]
            return None

    for name in list(runners):
        if attempt(name, prompt_ids[:8], 4) is not None and llm.device.type == "cuda":  # warm-up
            attempt(name, prompt_ids, gen_len)  # every context width once: CUDA graphs are captured here, not timed
    for _ in range(repeats):
        for name in list(runners):
            sample = attempt(name, prompt_ids, gen_len)
            if sample is not None:
                samples[name].append(sample)
            if name.startswith("loom"):
                ran[name] = llm.engine.runner.last_decode_step
    llm.engine.runner.prefer(None)
    return samples, ran


def _bandwidth(llm: LLM) -> float:
    if llm.device.type == "cuda":
        return measure_device_bandwidth(llm.device)["copy"]
    return measure_memory_bandwidth()


def run_latency(model: str | None = None, *, batch: int = 1, prompt_len: int = 32, gen_len: int = 128,
                peers: Sequence[str] = PEERS, weights: str | None = None, dtype: str | None = None,
                repeats: int = 3, device: str = "cpu", rope_scaling: Any = None,
                structured: dict | None = None) -> dict[str, Any]:
    """On CUDA the bandwidth roof is the GPU's measured device-to-device copy bandwidth (bytes read +
    written), and loom's first decode steps at each context width capture CUDA graphs: the warm-up
    run covers the whole workload so that no timed run captures. ``rope_scaling`` overrides loom's
    RoPE scaling (``load_model``); the HF peer runs the file as it is. The llama.cpp peer runs in its
    own process: if it fails (an exception, an exit, a signal such as SIGILL), its result is
    ``{"error": ...}`` and the others are measured as usual. ``structured`` (a JSON schema) adds
    "loom-structured": the same runs with the text constrained to the schema (they end where it completes),
    its decode tokens/s over plain loom's, and the mask time per token."""
    _check(batch, prompt_len, gen_len, repeats, peers)
    llm = LLM(model, weights=weights, dtype=dtype, device=device, rope_scaling=rope_scaling)
    dtype = dtype or str(llm.model.dtype).replace("torch.", "")  # HF runs dense in loom's dense dtype
    prompt_ids = benchmark_prompt_ids(llm.tokenizer, prompt_len)
    context = prompt_len + gen_len / 2  # mean context over the decode
    bytes_tok = decode_bytes_per_token(llm.model, context)
    element = 2 if dtype in ("bfloat16", "float16") else 4
    hf_bytes = dense_weight_bytes_per_token(llm.config, element) + context * llm.config.kv_bytes_per_token(element)
    runners, errors, isolated = _runners(llm, peers, dtype)
    if structured is not None:
        runners["loom-structured"] = loom_runner(llm, structured=StructuredOutput(json=structured))
    try:
        bandwidth = _bandwidth(llm)
        samples, ran = _time_runners(llm, runners, errors, prompt_ids, gen_len, repeats)
    finally:
        for peer in isolated:
            peer.close()
    gguf_bytes = os.path.getsize(llm.model_path) if llm.model_path.endswith(".gguf") else 0
    peer_bytes = {"hf": hf_bytes, "llamacpp": gguf_bytes + context * llm.config.kv_bytes_per_token(2)}
    results: dict[str, Any] = {
        name: {"dtype": None if name == "llamacpp" else dtype,
               **_summary(s, prompt_len, bytes_tok if name.startswith("loom") else peer_bytes[name], bandwidth)}
        for name, s in samples.items()}
    for name in results:
        if name.startswith("loom"):
            results[name]["weights"] = _weights_label(llm)
            results[name]["decode_step"] = ran[name]
    results["loom"]["load_s"] = llm.load_seconds
    results["loom"]["decode_steps"] = llm.engine.runner.describe_steps()
    if "loom-structured" in results:
        grammars = llm.engine.grammars
        results["loom-structured"].update(
            schema=structured, decode_vs_unconstrained=results["loom-structured"]["decode_tokens_per_s"]
            / results["loom"]["decode_tokens_per_s"],
            mask_us_per_token=1e6 * grammars.mask_seconds / max(grammars.masked_rows, 1))
    results.update({name: {"error": error} for name, error in errors.items()})
    speedup = {peer: {"decode": results["loom"]["decode_tokens_per_s"] / results[peer]["decode_tokens_per_s"],
                      "prefill": results[peer]["prefill_s"] / results["loom"]["prefill_s"]}
               for peer in ("hf", "llamacpp") if peer in samples} or None
    return {
        "benchmark": "latency", "model": llm.model_path, "batch": batch, "prompt_len": prompt_len,
        "gen_len": gen_len, "repeats": repeats, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
        "memory_bandwidth_GBps": bandwidth / 1e9, "results": results, "speedup": speedup,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
