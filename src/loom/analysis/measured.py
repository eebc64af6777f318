"""loom's own runs on the roofline: achieved FLOP/s and bytes/s of prefill and decode.

Times come from ``loom bench latency``'s runner (``loom.analysis.runs.loom_runner``, via
``measure_loom``, or a saved ``loom bench latency --json``); the work done comes from the analytic
counts of ``roofline.forward_ops``:

    achieved FLOP/s = analytic FLOPs / measured seconds,   achieved bytes/s = analytic bytes / seconds.

Prefill is one forward over the prompt (n = l = prompt_len); decode is one token at the mean context
of the bench's decode loop, prompt_len + gen_len / 2 (the context bench latency uses for its limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loom.analysis.presets import Precision, read_model_config
from loom.analysis.roofline import forward_ops, phase_cost
from loom.config import ModelConfig


@dataclass
class MeasuredPoint:
    label: str
    phase: str
    n: int
    l: int
    flops: float  # analytic, one step
    bytes: float  # analytic, one step
    seconds: float  # measured, one step

    @property
    def achieved_flops(self) -> float:
        return self.flops / self.seconds

    @property
    def achieved_bandwidth(self) -> float:
        return self.bytes / self.seconds

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "phase": self.phase, "n": self.n, "l": self.l, "flops": self.flops,
                "bytes": self.bytes, "seconds": self.seconds, "achieved_flops": self.achieved_flops,
                "achieved_bandwidth_Bps": self.achieved_bandwidth, "intensity_flop_per_byte": self.intensity}


def decode_context(bench: dict[str, Any]) -> int:
    return int(round(bench["prompt_len"] + bench["gen_len"] / 2))


def precision_from_bench(config: ModelConfig, bench: dict[str, Any], engine: str = "loom") -> Precision:
    """Bytes per element as the benchmarked model holds them.

    Activations and KV use the bench's dtype; the weights' element size is what bench latency's own
    traffic count implies (weights + KV bytes per decode token), so a model kept quantized in memory
    is charged its real bytes.
    """
    act = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[bench["results"][engine]["dtype"]]
    base = Precision.of(act)
    ctx = decode_context(bench)
    kv_bytes = ctx * config.kv_bytes_per_token(base.kv)
    weight_elems = sum(o.total_stored_elements for o in forward_ops(config, "decode", 1, ctx)
                       if o.group not in ("attn_act",))
    weight = (bench["results"][engine]["bytes_per_token"] - kv_bytes) / weight_elems
    names = {**base.names, "weight": f"{weight:.3g} B/element (from bench latency)"}
    return Precision(weight, base.kv, base.act, act, names)


def points_from_bench(bench: dict[str, Any], config: ModelConfig | None = None,
                      precision: Precision | None = None, engine: str = "loom") -> list[MeasuredPoint]:
    """Prefill and decode points from a ``loom bench latency --json`` result."""
    config = config or read_model_config(bench["model"])
    precision = precision or precision_from_bench(config, bench, engine)
    r = bench["results"][engine]
    n = bench["prompt_len"]
    ctx = decode_context(bench)
    pf, pb = phase_cost(config, "prefill", n, n, precision)
    df, db = phase_cost(config, "decode", 1, ctx, precision)
    return [MeasuredPoint(f"{engine} prefill (n={n})", "prefill", n, n, pf, pb, r["prefill_s"]),
            MeasuredPoint(f"{engine} decode (l={ctx})", "decode", 1, ctx, df, db, 1.0 / r["decode_tokens_per_s"])]


def measure_loom(model: str | None = None, prompt_len: int = 128, gen_len: int = 32, repeats: int = 3,
                 dtype: str = "float32") -> dict[str, Any]:
    """Time loom's prefill and decode with bench latency's own runner; returns bench latency's JSON shape.

    The runs are ``loom.analysis.runs.loom_runner``'s, as bench latency's (greedy, exactly ``gen_len``
    tokens, best of ``repeats`` after a warm-up), on an engine with prefix caching off. ``loom bench
    latency`` keeps it on, so its repeats 2.. find the prompt's blocks cached and its best prefill time
    is only partly a prefill; a roofline point needs the whole prefill.
    """
    import platform
    import time

    import torch

    from loom.analysis.runs import benchmark_prompt_ids, loom_runner
    from loom.analysis.traffic import decode_bytes_per_token
    from loom.config import CacheConfig
    from loom.llm import LLM

    if prompt_len < 1 or gen_len < 2 or repeats < 1:
        raise ValueError("prompt_len and repeats must be >= 1, gen_len >= 2")
    llm = LLM(model, dtype=dtype, cache=CacheConfig(enable_prefix_caching=False))
    prompt_ids = benchmark_prompt_ids(llm.tokenizer, prompt_len)
    run = loom_runner(llm)
    run(prompt_ids[:8], 4)  # warm-up
    samples = [run(prompt_ids, gen_len) for _ in range(repeats)]
    best_prefill = min(s.prefill_s for s in samples)
    best_decode = max(s.decode_tokens_per_s for s in samples)
    return {
        "benchmark": "latency (loom analyze plot --measure: prefix caching off)", "model": llm.model_path,
        "batch": 1, "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "prefix_caching": False,
        "results": {"loom": {"dtype": dtype, "prefill_s": best_prefill, "prefill_tokens_per_s": prompt_len / best_prefill,
                             "prefill_s_runs": [s.prefill_s for s in samples], "decode_tokens_per_s": best_decode,
                             "decode_tokens_per_s_runs": [s.decode_tokens_per_s for s in samples],
                             "bytes_per_token": decode_bytes_per_token(llm.model, prompt_len + gen_len / 2)}},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
