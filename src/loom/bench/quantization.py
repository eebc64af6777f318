"""`loom bench quantization`: what each quantization method costs in quality and buys in size and speed.

For every configuration, from one run on the same machine: perplexity on the evaluation corpus
(GPTQ protocol: non-overlapping windows), the bytes a decode step reads for weights, the nominal
bits per weight (code bits + one fp16 scale and one fp16 zero per group), and batch-1 decode
tokens/s. Each quantized model is written with ``save_checkpoint`` and loaded back the way a user
would (``LLM(folder)``), so the round trip is part of what is measured. Calibration uses a
different text from the evaluation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loom.analysis.traffic import weight_bytes_per_token
from loom.analysis.runs import benchmark_prompt_ids, loom_runner
from loom.cache import cache_dir
from loom.compress.calibration import CalibrationConfig, calibration_samples
from loom.compress.quantize.gptq import GPTQConfig
from loom.compress.quantize.methods import QuantizeRecipe, quantize
from loom.compress.quantize.rtn import QuantConfig
from loom.default_model import default_model_path
from loom.eval.corpora import corpus_path, read_corpus
from loom.config import CacheConfig
from loom.eval.perplexity import engine_perplexity, perplexity, window_nll
from loom.llm import LLM
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint


@dataclass
class CompressionInputs:
    """What a compression benchmark (quantization, pruning) starts from: the dense fp32 model, the
    tokenized evaluation text, calibration samples from a different text, and where checkpoints go."""

    path: str
    out_dir: str
    base: LLM
    eval_path: str
    eval_ids: list[int]
    calib_path: str
    calib_samples: torch.Tensor

    @classmethod
    def prepare(cls, model: str | None, corpus: str, calib: str, samples: int, seq_len: int,
                out_dir: str | None, subdir: str) -> CompressionInputs:
        path = model or default_model_path()
        out_dir = out_dir or os.path.join(cache_dir(), subdir)
        base = LLM(path, weights="fp32")
        eval_path, calib_path = corpus_path(corpus), corpus_path(calib)
        eval_ids = base.tokenizer.encode(read_corpus(eval_path))
        calib_samples = calibration_samples(base.tokenizer.encode(read_corpus(calib_path)),
                                            CalibrationConfig(samples, seq_len, seed=0))
        return cls(path, out_dir, base, eval_path, eval_ids, calib_path, calib_samples)


@dataclass(frozen=True)
class Setting:
    name: str
    method: str  # "fp32", "native" (the GGUF as stored), or a QuantizeRecipe method
    bits: int = 32
    group: int = 0
    symmetric: bool = False
    alpha: float = 0.5

    def nominal_bits(self, in_features: int) -> float:
        if self.method in ("fp32", "kv-int8"):
            return 32.0
        if self.method in ("w8a8", "smoothquant"):
            return 8.0 + 16.0 / in_features  # one fp16 scale per output channel
        group = self.group or in_features
        return self.bits + (16.0 if self.symmetric else 32.0) / group


SETTINGS: tuple[Setting, ...] = (
    Setting("fp32", "fp32"),
    Setting("W8 RTN (per channel, sym)", "rtn", 8, 0, True),
    Setting("W4 g32 RTN", "rtn", 4, 32), Setting("W4 g32 AWQ", "awq", 4, 32), Setting("W4 g32 GPTQ", "gptq", 4, 32),
    Setting("W4 g64 RTN", "rtn", 4, 64), Setting("W4 g64 AWQ", "awq", 4, 64), Setting("W4 g64 GPTQ", "gptq", 4, 64),
    Setting("W3 g64 RTN", "rtn", 3, 64), Setting("W3 g64 AWQ", "awq", 3, 64), Setting("W3 g64 GPTQ", "gptq", 3, 64),
    Setting("W8A8 naive", "w8a8", 8), Setting("W8A8 SmoothQuant a=0.5", "smoothquant", 8, alpha=0.5),
    Setting("W8A8 SmoothQuant a=0.85", "smoothquant", 8, alpha=0.85),
    Setting("GGUF Q4_1 native (Q8_0 output)", "native", 4, 32),
    Setting("KV int8 (fp32 weights)", "kv-int8"),
)


PEER_SETTINGS: dict[str, tuple[str, ...]] = {
    "torchao": ("torchao int8 weight-only",),  # torchao 0.18's int4 weight-only has no CPU path here
    "quanto": ("quanto int8 weight-only", "quanto int4 weight-only"),
}


def merged_rows(rows: list[dict[str, Any]], merge: dict[str, Any] | None, order: Sequence[str]) -> list[dict[str, Any]]:
    """``rows`` of this run plus those of an earlier result (``merge``) it did not run again, in ``order``
    of setting names; each row with a perplexity gets ``perplexity_vs_fp32`` against the dense row's."""
    if merge is not None:
        done = {r["name"] for r in rows}
        rows = sorted([r for r in merge["results"] if r["name"] not in done] + rows,
                      key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    fp32 = next((r["perplexity"] for r in rows if r["method"] == "fp32"), None)
    for r in rows:
        if "perplexity" in r:
            r["perplexity_vs_fp32"] = None if fp32 is None else r["perplexity"] / fp32 - 1
    return rows


def _peer_model(name: str, folder: str) -> torch.nn.Module:
    """The HF fp32 model quantized by a peer library; the output head stays dense, as in loom's rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if name.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    else:
        from optimum.quanto import freeze, qint4, qint8, quantize as quanto_quantize

        quanto_quantize(model, weights=qint8 if "int8" in name else qint4, exclude="lm_head")
        freeze(model)
    return model


class _HFLogits:
    """An HF causal LM seen through loom's ``logits(ids)`` interface, so ``window_nll`` scores it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids[None]).logits[0]


def _hf_perplexity(model: torch.nn.Module, token_ids: list[int], window: int, max_tokens: int | None,
                   progress: bool) -> tuple[float, int]:
    """The GPTQ protocol (``eval.perplexity``'s windows and scores) on an HF model: (ppl, tokens scored).
    Under no_grad rather than inference mode: some peer libraries' tensors refuse the latter."""
    import math

    from tqdm import tqdm

    ids = torch.tensor(token_ids[: max_tokens or None])
    n = ids.numel() // window
    hf = _HFLogits(model)
    with torch.no_grad():
        nll = math.fsum(window_nll(hf, ids[s:s + window], ids[s + 1:s + window])  # type: ignore[arg-type]
                        for s in tqdm(range(0, n * window, window), desc="peer ppl", unit="window",
                                      disable=not progress))
    return math.exp(nll / (n * (window - 1))), n * (window - 1)


def _peer_rows(peers: Sequence[str], path: str, eval_ids: list[int], window: int, max_tokens: int | None,
               prompt_ids: list[int], gen_len: int, progress: bool) -> list[dict[str, Any]]:
    from loom.bench.peers import HFGenerate, hf_reference_copy

    folder = path if os.path.isdir(path) else hf_reference_copy(path)
    rows = []
    for peer in peers:
        for name in PEER_SETTINGS[peer]:
            t0 = time.perf_counter()
            try:
                model = _peer_model(name, folder)
                setup = time.perf_counter() - t0
                ppl, _ = _hf_perplexity(model, eval_ids, window, max_tokens, progress)
                gen = HFGenerate.from_model(model)
                gen.run(prompt_ids[:8], 4)
                tps = max(gen.run(prompt_ids, gen_len).decode_tokens_per_s for _ in range(2))
            except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
                rows.append({"name": name, "method": f"peer:{peer}", "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"name": name, "method": f"peer:{peer}", "bits": 8 if "int8" in name else 4,
                         "group_size": None, "nominal_bits_per_weight": 8.0 if "int8" in name else 4.0,
                         "perplexity": ppl, "weight_bytes_per_token": None, "decode_tokens_per_s": tps,
                         "quantize_and_load_s": setup})
            if progress:
                print(json.dumps(rows[-1]), flush=True)
            del model, gen
    return rows


def _decode_tokens_per_s(llm: LLM, prompt_len: int, gen_len: int, repeats: int) -> float:
    ids = benchmark_prompt_ids(llm.tokenizer, prompt_len)
    run = loom_runner(llm)
    run(ids[:8], 4)
    return max(run(ids, gen_len).decode_tokens_per_s for _ in range(repeats))


def run_quantization_bench(model: str | None = None, *, corpus: str = "britannica", window: int = 512,
                           max_tokens: int | None = 20480, calib: str = "hamlet", samples: int = 32,
                           seq_len: int = 512, only: Sequence[str] = (), out_dir: str | None = None,
                           prompt_len: int = 32, gen_len: int = 64, repeats: int = 2,
                           progress: bool = True, merge: dict[str, Any] | None = None,
                           peers: Sequence[str] = (), decode_only: bool = False) -> dict[str, Any]:
    """Every setting of ``SETTINGS`` (or those named in ``only``); ``merge``: an earlier result whose rows
    are kept unless run again here (to add or redo settings without rerunning all). ``decode_only``:
    load the checkpoints an earlier run wrote and measure decode speed again (on a quiet machine),
    keeping ``merge``'s perplexities."""
    if decode_only and merge is None:
        raise ValueError("--decode-only re-measures an earlier run: give it with --merge")
    inputs = CompressionInputs.prepare(model, corpus, calib, samples, seq_len, out_dir, "quantized")
    path, out_dir, base, eval_path, eval_ids = inputs.path, inputs.out_dir, inputs.base, inputs.eval_path, inputs.eval_ids
    calib_path, calib_samples, tokenizer = inputs.calib_path, inputs.calib_samples, base.tokenizer
    hidden = base.config.hidden_size
    rows: list[dict[str, Any]] = []
    unknown = set(peers) - set(PEER_SETTINGS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)} (available: {', '.join(PEER_SETTINGS)})")
    settings = [s for s in SETTINGS if not only or s.method in only or s.name in only]
    for s in settings:
        t0 = time.perf_counter()
        if s.method == "fp32":
            llm = base
        elif s.method == "native":
            llm = LLM(path, weights="native")
        elif s.method == "kv-int8":
            llm = LLM(path, weights="fp32", cache=CacheConfig(kv_dtype="int8"))
        else:
            folder = os.path.join(out_dir, s.name.replace(" ", "_").replace("(", "").replace(")", "")
                                  .replace(",", "").replace("=", ""))
            if not decode_only:
                m = load_model(path, weights="fp32").model
                recipe = QuantizeRecipe(method=s.method, quant=QuantConfig(s.bits, s.group, s.symmetric),
                                        gptq=GPTQConfig(), alpha=s.alpha)
                quantize(m, recipe, None if s.method == "rtn" else calib_samples)
                save_checkpoint(m, folder, recipe.metadata(), tokenizer)
                del m
            llm = LLM(folder)
        quantize_s = time.perf_counter() - t0
        if decode_only:
            earlier = next(r for r in merge["results"] if r["name"] == s.name)  # type: ignore[index]
            rows.append({**earlier, "decode_tokens_per_s": _decode_tokens_per_s(llm, prompt_len, gen_len, 3),
                         "decode_steps": llm.engine.runner.describe_steps()})
            if progress:
                print(json.dumps(rows[-1]), flush=True)
            continue
        if s.method == "kv-int8":  # the cache's format matters only when attention reads the cache
            ppl = engine_perplexity(llm, eval_ids, window, max_tokens=max_tokens, progress=progress)
        else:
            ppl = perplexity(llm.model, eval_ids, window, max_tokens=max_tokens, progress=progress)
        tps = _decode_tokens_per_s(llm, prompt_len, gen_len, repeats)
        rows.append({"name": s.name, "method": s.method, "bits": s.bits, "group_size": s.group,
                     "tokens_scored": ppl.tokens_scored,
                     "nominal_bits_per_weight": round(s.nominal_bits(hidden), 3),
                     "perplexity": ppl.perplexity, "weight_bytes_per_token": weight_bytes_per_token(llm.model),
                     "decode_tokens_per_s": tps, "decode_steps": llm.engine.runner.describe_steps(),
                     "quantize_and_load_s": quantize_s})
        if progress:
            print(json.dumps(rows[-1]), flush=True)
        if llm is not base:
            del llm
    if peers and not decode_only:
        rows += _peer_rows(peers, path, eval_ids, window, max_tokens, benchmark_prompt_ids(tokenizer, prompt_len),
                           gen_len, progress)
    rows = merged_rows(rows, merge, [s.name for s in SETTINGS])
    scored = merge["tokens_scored"] if merge is not None else rows[0].get("tokens_scored")
    return {"model": path, "corpus": eval_path, "window": window, "tokens_scored": scored,
            "calibration": {"text": calib_path, "samples": samples, "seq_len": seq_len},
            "threads": torch.get_num_threads(), "decode": {"prompt_len": prompt_len, "gen_len": gen_len},
            "results": rows}


def plot_quantization(result: dict[str, Any], path: str) -> None:
    """Perplexity against nominal bits per weight, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"fp32": "*", "rtn": "o", "awq": "s", "gptq": "^", "w8a8": "x", "smoothquant": "D", "native": "P",
               "kv-int8": "v", "peer:torchao": "1", "peer:quanto": "2"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in markers.items():
        pts = [r for r in result["results"] if r["method"] == method and "perplexity" in r]
        if pts:
            ax.scatter([r["nominal_bits_per_weight"] for r in pts], [r["perplexity"] for r in pts], marker=marker,
                       s=60, label=method)
    for r in (r for r in result["results"] if "perplexity" in r and r["nominal_bits_per_weight"] < 7):
        ax.annotate(r["name"], (r["nominal_bits_per_weight"], r["perplexity"]), fontsize=6,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + fp16 scale/zero per group)")
    ax.set_ylabel(f"perplexity ({os.path.basename(result['corpus'])}, L={result['window']})")
    ax.set_title("SmolLM2-135M: quality against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
