"""Perplexity over non-overlapping windows, the protocol of the GPTQ repository (IST-DASLab/gptq,
``opt_eval`` / ``llama_eval``), which most quantization and pruning papers report:

1. Tokenize the whole corpus once, as one string, with the tokenizer's own special tokens: a BOS
   begins the text only if the tokenizer adds one (LLaMA's does, SmolLM2's does not). No BOS is
   inserted at window starts.
2. Cut the ids into ``n = len(ids) // L`` non-overlapping windows of ``L`` tokens; the leftover
   tail is dropped.
3. Run every window on its own, positions from 0, no context carried over from the previous one.
4. Score tokens 1..L-1 of each window given their prefix (logits shifted against labels inside
   the window), so a window contributes ``L - 1`` predictions.
5. ``ppl = exp(sum NLL / (n * (L - 1)))``.

GPTQ writes step 5 as ``exp(sum_i(mean_nll_i * L) / (n * L))``: the same number, because every
window scores the same ``L - 1`` tokens.

``protocol="shifted"`` keeps steps 1-3 but shifts the labels along the whole stream instead of
inside each window (inputs ``ids[:-1]``, targets ``ids[1:]``, as nanoGPT-style evaluation does):
the last position of window i also predicts the first token of window i+1, so every used token
but the very first is scored, ``n * L - 1`` in all. This is the accounting of the project's HF
reference figure (26.445 on 20,479 tokens of britannica-11th.txt, L = 512, 20,480 tokens).

Log-softmax runs in fp32 and NLLs are summed in fp64, so the figure does not depend on the
summation order; windows go one at a time (no batching), which keeps every window's arithmetic
identical to running it alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch
from tqdm import tqdm

from loom.models.transformer import Transformer

Protocol = Literal["gptq", "shifted"]
PROTOCOLS: dict[str, str] = {
    "gptq": "whole text tokenized once; non-overlapping windows of L run independently; labels shifted inside "
            "each window (L-1 scored per window); leftover tail dropped; ppl = exp(sum NLL / tokens_scored)",
    "shifted": "as gptq, but labels shifted along the whole stream: each window's last position predicts the next "
               "window's first token (n*L-1 scored); ppl = exp(sum NLL / tokens_scored)",
}


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float  # nats, over every scored token
    tokens_scored: int  # gptq: windows * (window - 1); shifted: windows * window - 1
    windows: int
    window: int  # L
    tokens_used: int  # windows * window: the tokens fed to the model
    tokens_total: int  # the token stream before --max-tokens and before dropping the tail
    seconds: float  # forward passes and losses only
    protocol: str = "gptq"
    window_nll: list[float] = field(default_factory=list, repr=False)  # per-window NLL sums

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_used / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self, per_window: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not per_window:
            d.pop("window_nll")
        d["mean_nll"] = self.mean_nll
        d["tokens_per_s"] = self.tokens_per_s
        return d


def window_nll(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over t of -log p(targets[t] | inputs[:t + 1]), the window run from position 0."""
    logits = model.logits(inputs)[:targets.numel()]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, targets[:, None]).double().sum().item()


def perplexity(model: Transformer, token_ids: Sequence[int] | torch.Tensor, window: int,
               max_tokens: int | None = None, progress: bool = True, *,
               protocol: Protocol = "gptq") -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` (the whole corpus, tokenized once); see the module docstring.

    ``max_tokens`` keeps only the first that many tokens before the windows are cut, so
    ``max_tokens=20480, window=512`` gives 40 windows: 40 * 511 = 20,440 scored tokens under
    ``protocol="gptq"``, 40 * 512 - 1 = 20,479 under ``"shifted"``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    total = ids.numel()
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one context, one prediction), got {window}")
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window {window} exceeds the model's context of {model.config.max_position_embeddings}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        ids = ids[:max_tokens]
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens make no window of {window}")
    used = ids[:n * window]
    # Labels of the window starting at s: within it (gptq), or running one past its end (shifted);
    # either way never beyond the used tokens, so the last window of "shifted" scores L - 1.
    label_span = window if protocol == "shifted" else window - 1
    sums: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in tqdm(range(0, n * window, window), desc=f"ppl (L={window})", unit="window", disable=not progress):
            sums.append(window_nll(model, used[s:s + window], used[s + 1:s + 1 + label_span]))
    seconds = time.perf_counter() - t0
    scored = n * window - 1 if protocol == "shifted" else n * (window - 1)
    nll = math.fsum(sums)
    return PerplexityResult(perplexity=math.exp(nll / scored), nll_sum=nll, tokens_scored=scored, windows=n,
                            window=window, tokens_used=n * window, tokens_total=total, seconds=seconds,
                            protocol=protocol, window_nll=sums)


def engine_perplexity(llm: Any, token_ids: Sequence[int], window: int, max_tokens: int | None = None,
                      progress: bool = True) -> PerplexityResult:
    """The GPTQ protocol run through the serving engine (``LLM``): each window is a prompt whose
    prompt logprobs are the scores. Everything the engine does on the way (the paged KV cache and
    its storage format, e.g. int8) is part of what is measured; with an fp cache it equals
    ``perplexity``."""
    from loom.sampling_params import SamplingParams

    ids = list(token_ids)[: max_tokens or None]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"{len(ids)} tokens make no window of {window}")
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    sums: list[float] = []
    t0 = time.perf_counter()
    for s in tqdm(range(0, n * window, window), desc=f"ppl via engine (L={window})", unit="window",
                  disable=not progress):
        chunk = ids[s:s + window]
        llm.engine.block_manager.reset_prefix_cache()
        out = llm.generate([chunk], params)[0]
        sums.append(-math.fsum(entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], chunk[1:])))
    nll, scored = math.fsum(sums), n * (window - 1)
    return PerplexityResult(perplexity=math.exp(nll / scored), nll_sum=nll, tokens_scored=scored, windows=n,
                            window=window, tokens_used=n * window, tokens_total=len(list(token_ids)),
                            seconds=time.perf_counter() - t0, protocol="gptq", window_nll=sums)


def load_for_eval(model_path: str | None = None, dtype: str | None = None, weights: str | None = None,
                  rope_scaling: Any = None):
    """(LoadedModel, Tokenizer) built the way ``LLM`` builds them, without a serving engine or KV cache.

    ``weights`` goes to ``load_model`` ("fp32", "bf16", "native", ...) only when given;
    ``rope_scaling`` overrides the file's RoPE scaling (``load_model``).
    """
    from loom.default_model import default_model_path
    from loom.tokenizer import load_tokenizer
    from loom.weights.loader import choose_weights, load_model

    model_path = model_path or default_model_path()
    weights, dtype = choose_weights(weights, dtype)  # as LLM: native unless told otherwise
    loaded = load_model(model_path, dtype=dtype, weights=weights, rope_scaling=rope_scaling)
    return loaded, load_tokenizer(model_path, loaded.metadata, loaded.config.eos_token_ids)


def run_perplexity(model_path: str | None = None, corpus: str = "britannica", window: int = 512,
                   max_tokens: int | None = None, dtype: str | None = None, weights: str | None = None,
                   progress: bool = True, protocol: Protocol = "gptq", rope_scaling: Any = None) -> dict[str, Any]:
    """Load a model and its tokenizer, tokenize ``corpus`` whole and score it (for ``loom eval ppl``)."""
    from loom.eval.corpora import corpus_path, read_corpus

    path = corpus_path(corpus)
    text = read_corpus(path)
    loaded, tokenizer = load_for_eval(model_path, dtype, weights, rope_scaling)
    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    tokenize_s = time.perf_counter() - t0
    result = perplexity(loaded.model, ids, window, max_tokens=max_tokens, progress=progress, protocol=protocol)
    scaling = loaded.config.rope_scaling
    return {"model": loaded.path, "dtype": dtype, "weights": weights, "corpus": corpus,
            "rope_scaling": None if scaling is None else asdict(scaling), "context": loaded.config.max_position_embeddings, "corpus_path": path,
            "corpus_chars": len(text), "bos_at_start": bool(ids) and ids[0] == tokenizer.bos_token_id,
            "max_tokens": max_tokens, **result.to_dict(), "protocol_description": PROTOCOLS[protocol],
            "load_s": loaded.load_seconds, "tokenize_s": tokenize_s}
