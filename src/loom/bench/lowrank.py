"""`loom bench lowrank`: what low-rank factorization of the decoder linears costs in quality, per parameter kept.

For each budget (fraction of every decoder projection's parameters kept) and method (plain truncated SVD,
activation-aware ASVD), from one run: the ranks chosen, the fraction of the decoder linears' parameters kept
(and of the whole model's), each projection's relative weight error and output error on the calibration
text, and the perplexity on the evaluation corpus (GPTQ protocol, as ``bench/pruning.py`` and
``bench/quantization.py``). Each factorized model is written with ``save_checkpoint`` and loaded back the way
a user would (``LLM(folder)``), so the round trip is part of what is measured. Calibration uses a different
text from the evaluation. No speed is measured here.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loom.bench.quantization import CompressionInputs, merged_rows
from loom.compress.lowrank import LowRankConfig, decoder_linear_fraction, factorize
from loom.eval.perplexity import perplexity
from loom.llm import LLM
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint

KEEPS = (0.9, 0.75, 0.5)
METHODS = ("svd", "asvd")


@dataclass(frozen=True)
class Setting:
    name: str
    method: str  # "fp32" (the dense model) or a low-rank method
    keep: float = 1.0

    @staticmethod
    def of(method: str, keep: float) -> Setting:
        return Setting(f"{method.upper()} keep {keep:g}", method, keep)


def settings(keeps: Sequence[float] = KEEPS, methods: Sequence[str] = METHODS) -> list[Setting]:
    return [Setting("dense (fp32)", "fp32")] + [Setting.of(m, k) for k in keeps for m in methods]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_lowrank_bench(model: str | None = None, *, corpus: str = "britannica", window: int = 512,
                      max_tokens: int | None = 20480, calib: str = "hamlet", samples: int = 32, seq_len: int = 512,
                      keeps: Sequence[float] = KEEPS, methods: Sequence[str] = METHODS, alpha: float = 0.5,
                      only: Sequence[str] = (), out_dir: str | None = None, progress: bool = True,
                      merge: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting of ``settings(keeps, methods)`` (or those whose method or name is in ``only``); ``merge``:
    an earlier result whose rows are kept unless run again here."""
    inputs = CompressionInputs.prepare(model, corpus, calib, samples, seq_len, out_dir, "lowrank")
    base, tokenizer = inputs.base, inputs.base.tokenizer
    dense_params = _params(base.model)
    rows: list[dict[str, Any]] = []
    order = settings(keeps, methods)
    for s in (s for s in order if not only or s.method in only or s.name in only):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"name": s.name, "method": s.method, "keep": s.keep}
        if s.method == "fp32":
            llm = base
            row.update(rank_min=None, rank_max=None, weight_error_mean=0.0, output_error_mean=0.0)
        else:
            config = LowRankConfig(s.keep, s.method, alpha)
            m = load_model(inputs.path, weights="fp32").model
            report = factorize(m, config, inputs.calib_samples)
            meta = {**config.metadata(), "decoder_linear_params_kept": report.fraction_kept,
                    "calibration": {"text": inputs.calib_path, "samples": samples, "seq_len": seq_len, "seed": 0}}
            folder = os.path.join(inputs.out_dir, s.name.replace(" ", "_"))
            save_checkpoint(m, folder, tokenizer=tokenizer, lowrank=meta)
            del m
            llm = LLM(folder)
            low, high = report.rank_range
            row.update(rank_min=low, rank_max=high,
                       weight_error_mean=statistics.fmean(r.weight_error for r in report.layers),
                       output_error_mean=statistics.fmean(r.output_error or 0.0 for r in report.layers),
                       ranks={r.name.split(".", 2)[2]: r.rank for r in report.layers if r.name.startswith("layers.0.")},
                       checkpoint=folder)
        factorize_s = time.perf_counter() - t0
        ppl = perplexity(llm.model, inputs.eval_ids, window, max_tokens=max_tokens, progress=progress)
        row.update(decoder_linear_params_kept=decoder_linear_fraction(llm.model),
                   model_params=_params(llm.model), model_params_kept=_params(llm.model) / dense_params,
                   tokens_scored=ppl.tokens_scored, perplexity=ppl.perplexity, factorize_and_load_s=factorize_s)
        rows.append(row)
        if progress:
            print(json.dumps(row), flush=True)
        if llm is not base:
            del llm
    rows = merged_rows(rows, merge, [s.name for s in order])
    return {"model": inputs.path, "corpus": inputs.eval_path, "window": window,
            "tokens_scored": rows[0]["tokens_scored"] if rows else 0,
            "calibration": {"text": inputs.calib_path, "samples": samples, "seq_len": seq_len}, "alpha": alpha,
            "threads": torch.get_num_threads(), "results": rows}


def plot_lowrank(result: dict[str, Any], path: str) -> None:
    """Perplexity (log scale) against the fraction of the decoder linears' parameters kept, one line per
    method, the dense model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in result["results"] if r["method"] != "fp32"]
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["decoder_linear_params_kept"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method.upper())
        for x, y in pts:
            ax.annotate(f"{y:.0f}" if y >= 100 else f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    dense = next((r["perplexity"] for r in result["results"] if r["method"] == "fp32"), None)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense fp32 ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the decoder linears' parameters kept")
    ax.set_ylabel(f"perplexity ({os.path.basename(result['corpus'])}, L={result['window']})")
    ax.set_title("SmolLM2-135M: low-rank factorization of the decoder linears")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
