"""`loom eval context`: negative log-likelihood by position past the trained context, with and without
RoPE scaling (issue 8).

Protocol:

1. Tokenize the corpus once (as ``loom eval ppl`` does) and cut its first ``windows * L`` tokens into
   ``windows`` non-overlapping windows of L tokens (L = ``window``, e.g. 16,384 = 2 x SmolLM2's
   trained 8,192). Every method scores the same windows, so differences between methods are paired.
2. For each method, load the model with that RoPE scaling (``load_model(..., rope_scaling=...)``):
   "none" (the file's RoPE, extrapolated past its context), "linear" (position interpolation,
   Chen et al. 2306.15595), "ntk" (NTK-aware base change) or "yarn" (Peng et al. 2309.00071), each
   with factor s and original context L0. No fine-tuning: this is the zero-shot setting.
3. Run each window from position 0 in one forward (causal attention over the whole window, no KV
   cache, no sliding), and take -log p(x_t | x_<t) for every t in 1..L-1.
4. Group the targets by position t into buckets of B tokens ([0, B), [B, 2B), ...; the first bucket
   has B - 1 targets) and report, per method and bucket, the mean NLL over all windows and
   exp(mean NLL). Log-softmax runs in fp32 and sums in fp64.

A target at position t sees t tokens of context, so a bucket past L0 measures the model at context
lengths it was never trained on; the "none" row shows how it fails, the others whether scaling helps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from loom.config import RopeScaling, RopeScalingOverride
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

METHODS = ("none", "linear", "ntk", "yarn")


def position_nll(model: Transformer, ids: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """NLL [T - 1] (fp64) of tokens 1..T-1 of ``ids`` given their prefix, the window run from position 0.

    Logits are computed ``rows`` positions at a time: the full [T, vocab] matrix of a 16k window
    would take 3.2 GB in fp32.
    """
    ids = ids.flatten()
    with torch.inference_mode():
        hidden = model(ids, AttentionMetadata.uncached([ids.numel()]))[:-1]
        targets = ids[1:]
        out = torch.empty(targets.numel(), dtype=torch.float64)
        for s in range(0, targets.numel(), rows):
            logprobs = torch.log_softmax(model.compute_logits(hidden[s:s + rows]).float(), dim=-1)
            out[s:s + rows] = -logprobs.gather(-1, targets[s:s + rows, None].to(logprobs.device))[:, 0].double().cpu()
    return out


def bucket_sums(nll: torch.Tensor, bucket: int) -> tuple[list[float], list[int]]:
    """Sum and count of the NLLs of targets at positions [k B, (k + 1) B), k = 0, 1, ...; ``nll[i]`` is
    the target at position i + 1."""
    positions = torch.arange(1, nll.numel() + 1)
    index = positions // bucket
    n = int(index.max()) + 1 if nll.numel() else 0
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, index, nll.double())
    counts = torch.bincount(index, minlength=n)
    return sums.tolist(), counts.tolist()


def method_scaling(method: str, factor: float, original_context: int | None) -> RopeScalingOverride:
    """The ``load_model`` override of one method: "none" switches scaling off (the file's plain RoPE)."""
    if method == "none":
        return "none"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return RopeScaling(method, factor, original_context)  # type: ignore[arg-type]


@dataclass
class MethodResult:
    method: str
    rope_scaling: dict[str, Any] | None
    bucket_nll_sum: list[float]  # over all windows
    bucket_tokens: list[int]
    window_bucket_nll_sum: list[list[float]]  # [window][bucket]
    seconds: float

    @property
    def bucket_mean_nll(self) -> list[float]:
        return [s / n for s, n in zip(self.bucket_nll_sum, self.bucket_tokens)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bucket_mean_nll"] = self.bucket_mean_nll
        d["bucket_perplexity"] = [math.exp(x) for x in self.bucket_mean_nll]
        return d


def score_method(model: Transformer, windows: Sequence[torch.Tensor], bucket: int, method: str,
                 bar: tqdm | None = None) -> MethodResult:
    t0 = time.perf_counter()
    per_window, counts = [], []
    for w in windows:
        sums, counts = bucket_sums(position_nll(model, w), bucket)
        per_window.append(sums)
        if bar is not None:
            bar.update(1)
    total = [math.fsum(col) for col in zip(*per_window)]
    scaling = model.config.rope_scaling
    return MethodResult(method, None if scaling is None else dataclasses.asdict(scaling), total,
                        [c * len(windows) for c in counts], per_window, time.perf_counter() - t0)


def run_context(model_path: str | None = None, *, methods: Sequence[str] = METHODS, factor: float = 2.0,
                original_context: int | None = None, window: int = 16384, windows: int = 2, bucket: int = 2048,
                corpus: str = "britannica", weights: str = "fp32", progress: bool = True,
                out: str | None = None) -> dict[str, Any]:
    """Score ``windows`` windows of ``window`` tokens with every method (module docstring); with ``out``
    the JSON is rewritten after each method, so a long run keeps what it has measured."""
    from loom.default_model import default_model_path
    from loom.eval.corpora import corpus_path, read_corpus
    from loom.tokenizer import load_tokenizer
    from loom.weights.loader import load_model

    if window < 2 or windows < 1 or bucket < 1:
        raise ValueError("window must be at least 2, windows and bucket at least 1")
    for m in methods:
        method_scaling(m, factor, original_context)  # fail before the first (long) forward
    model_path = model_path or default_model_path()
    path = corpus_path(corpus)
    result: dict[str, Any] = {"model": model_path, "weights": weights, "corpus": corpus, "corpus_path": path,
                              "window": window, "windows": windows, "bucket": bucket, "factor": factor,
                              "methods": list(methods), "threads": torch.get_num_threads(),
                              "protocol": __doc__.split("Protocol:")[1].split("A target at")[0].strip()}
    token_windows: list[torch.Tensor] | None = None
    rows: dict[str, Any] = {}
    with tqdm(total=len(methods) * windows, desc=f"context (L={window})", unit="window",
              disable=not progress) as bar:
        for m in methods:
            loaded = load_model(model_path, weights=weights,
                                rope_scaling=method_scaling(m, factor, original_context))
            if token_windows is None:
                tokenizer = load_tokenizer(model_path, loaded.metadata, loaded.config.eos_token_ids)
                ids = torch.tensor(tokenizer.encode(read_corpus(path)), dtype=torch.long)
                if ids.numel() < window * windows:
                    raise ValueError(f"{corpus} has {ids.numel()} tokens: too few for {windows} windows of {window}")
                token_windows = [ids[i * window:(i + 1) * window] for i in range(windows)]
                result["tokens_total"] = ids.numel()
                result["trained_context"] = (original_context
                                             or (loaded.config.rope_scaling.original_max_position
                                                 if loaded.config.rope_scaling else loaded.config.max_position_embeddings))
            bar.set_postfix_str(m)
            rows[m] = score_method(loaded.model, token_windows, bucket, m, bar).to_dict()
            result["results"] = rows
            if out:
                with open(out, "w") as f:
                    json.dump(result, f, indent=2)
    return result


def summary_rows(result: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(bucket label, mean NLL per method) for each position bucket."""
    b, methods = result["bucket"], result["methods"]
    n = len(result["results"][methods[0]]["bucket_mean_nll"])
    return [(f"{k * b // 1024}-{(k + 1) * b // 1024}k" if b % 1024 == 0 else f"{k * b}-{(k + 1) * b}",
             [result["results"][m]["bucket_mean_nll"][k] for m in methods]) for k in range(n)]


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: mean NLL (perplexity) per position bucket and method."""
    methods = result["methods"]
    lines = ["| positions | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for label, values in summary_rows(result):
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f} ({math.exp(v):.1f})" for v in values) + " |")
    return "\n".join(lines)


def plot_context(result: dict[str, Any], path: str) -> None:
    """Mean NLL per position bucket, one line per method, the trained context marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["bucket"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in result["methods"]:
        y = result["results"][m]["bucket_mean_nll"]
        x = [(k + 0.5) * b / 1024 for k in range(len(y))]
        label = m if m == "none" else f"{m} x{result['factor']:g}"
        ax.plot(x, y, marker="o", label=label)
    if result.get("trained_context"):
        ax.axvline(result["trained_context"] / 1024, color="gray", linestyle="--", linewidth=1)
        ax.annotate("trained context", (result["trained_context"] / 1024, ax.get_ylim()[1]), fontsize=8,
                    xytext=(4, -12), textcoords="offset points", color="gray")
    ax.set_xlabel(f"position in the window (k tokens; buckets of {b})")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title(f"{result['window']}-token windows, {result['windows']} x {result['corpus']}: RoPE scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
