"""`loom bench pruning`: what each pruning method costs in quality, at 50% unstructured and N:M.

For every configuration, from one run: the fraction of the decoder linears' weights that are zero and
the perplexity on the evaluation corpus (GPTQ protocol, as in ``bench/quantization.py``). Each pruned
model is written with ``save_checkpoint`` and loaded back the way a user would (``LLM(folder)``), so
the round trip is part of what is measured. Calibration uses a different text from the evaluation.
No speed is measured: zeros in dense matrices run through the same dense kernels at the same speed.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loom.bench.quantization import CompressionInputs, merged_rows
from loom.compress.prune.masks import NMPattern, Target, describe
from loom.compress.prune.methods import PruneRecipe, linear_sparsity, prune
from loom.compress.quantize.rtn import QuantConfig
from loom.eval.perplexity import perplexity
from loom.llm import LLM
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint


@dataclass(frozen=True)
class Setting:
    name: str
    method: str  # "fp32" or a pruning method
    target: Target = 0.0
    bits: int | None = None  # also quantize, group 64
    group: int = 64

    def recipe(self) -> PruneRecipe:
        quant = None if self.bits is None else QuantConfig(self.bits, self.group)
        return PruneRecipe(self.method, self.target, quant)


_2_4, _4_8 = NMPattern(2, 4), NMPattern(4, 8)
SETTINGS: tuple[Setting, ...] = (
    Setting("fp32 (dense)", "fp32"),
    Setting("magnitude 50%", "magnitude", 0.5), Setting("Wanda 50%", "wanda", 0.5),
    Setting("SparseGPT 50%", "sparsegpt", 0.5),
    Setting("magnitude 4:8", "magnitude", _4_8), Setting("Wanda 4:8", "wanda", _4_8),
    Setting("SparseGPT 4:8", "sparsegpt", _4_8),
    Setting("magnitude 2:4", "magnitude", _2_4), Setting("Wanda 2:4", "wanda", _2_4),
    Setting("SparseGPT 2:4", "sparsegpt", _2_4),
    Setting("W4 g64 RTN (no pruning)", "magnitude", 0.0, 4),
    Setting("SparseGPT 0% + W4 g64 (GPTQ without act-order)", "sparsegpt", 0.0, 4),
    Setting("Wanda 50% + W4 g64 RTN", "wanda", 0.5, 4),
    Setting("SparseGPT 50% + W4 g64 (joint)", "sparsegpt", 0.5, 4),
)


def _folder(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, re.sub(r"[^A-Za-z0-9%:+-]+", "_", name).strip("_").replace(":", "-"))


def run_pruning_bench(model: str | None = None, *, corpus: str = "britannica", window: int = 512,
                      max_tokens: int | None = 20480, calib: str = "hamlet", samples: int = 32, seq_len: int = 512,
                      only: Sequence[str] = (), out_dir: str | None = None, progress: bool = True,
                      merge: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting of ``SETTINGS`` (or those whose method or name is in ``only``); ``merge``: an earlier
    result whose rows are kept unless run again here."""
    inputs = CompressionInputs.prepare(model, corpus, calib, samples, seq_len, out_dir, "pruned")
    path, out_dir, base, eval_path, eval_ids = inputs.path, inputs.out_dir, inputs.base, inputs.eval_path, inputs.eval_ids
    calib_path, calib_samples, tokenizer = inputs.calib_path, inputs.calib_samples, base.tokenizer
    rows: list[dict[str, Any]] = []
    for s in (s for s in SETTINGS if not only or s.method in only or s.name in only):
        t0 = time.perf_counter()
        if s.method == "fp32":
            llm = base
        else:
            recipe = s.recipe()
            m = load_model(path, weights="fp32").model
            prune(m, recipe, None if s.method == "magnitude" else calib_samples)
            folder = _folder(out_dir, s.name)
            meta = recipe.metadata()
            if s.method != "magnitude":
                meta["calibration"] = {"text": calib_path, "samples": samples, "seq_len": seq_len, "seed": 0}
            save_checkpoint(m, folder, recipe.quantization_metadata(), tokenizer, pruning=meta)
            del m
            llm = LLM(folder)
        prune_s = time.perf_counter() - t0
        ppl = perplexity(llm.model, eval_ids, window, max_tokens=max_tokens, progress=progress)
        rows.append({"name": s.name, "method": s.method, **describe(s.target), "bits": s.bits,
                     "group_size": s.group if s.bits else None, "linear_sparsity": linear_sparsity(llm.model),
                     "tokens_scored": ppl.tokens_scored, "perplexity": ppl.perplexity, "prune_and_load_s": prune_s})
        if progress:
            print(json.dumps(rows[-1]), flush=True)
        if llm is not base:
            del llm
    rows = merged_rows(rows, merge, [s.name for s in SETTINGS])
    return {"model": path, "corpus": eval_path, "window": window, "tokens_scored": rows[0]["tokens_scored"],
            "calibration": {"text": calib_path, "samples": samples, "seq_len": seq_len},
            "threads": torch.get_num_threads(), "results": rows}


def plot_pruning(result: dict[str, Any], path: str) -> None:
    """Perplexity of each method at each sparsity target (bars), the dense model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r["method"] != "fp32"]
    columns = list(dict.fromkeys(_column(r) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, method in enumerate(methods):
        pts = [(columns.index(_column(r)), r["perplexity"]) for r in rows if r["method"] == method]
        xs = [x + (j - (len(methods) - 1) / 2) * width for x, _ in pts]
        bars = ax.bar(xs, [p for _, p in pts], width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    dense = next((r["perplexity"] for r in result["results"] if r["method"] == "fp32"), None)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense fp32 ({dense:.2f})")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity ({os.path.basename(result['corpus'])}, L={result['window']})")
    ax.set_title("SmolLM2-135M: pruning the decoder linears")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _column(row: dict[str, Any]) -> str:
    """The x-axis group of a row: its target, plus its grid when quantized (unpruned: the quantizer alone,
    magnitude's bar being RTN and SparseGPT's GPTQ without act-order)."""
    target = row["pattern"] or (f"{100 * row['sparsity']:.0f}%" if row["sparsity"] else "unpruned")
    return target if row["bits"] is None else f"{target} + W{row['bits']} g{row['group_size']}"
