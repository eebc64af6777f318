"""`loom bench kv-eviction` and `loom bench streaming`: what bounded KV memory costs and buys.

kv-eviction: the long-context experiment of StreamingLLM (Xiao et al. 2309.17453, figure 3) and H2O
(Zhang et al. 2306.14048). One text of T tokens is scored token by token (teacher forcing through
``prompt_logprobs``; ``chunk`` tokens per step: with 1 every prediction sees exactly the policy's cache,
with c > 1 a token also sees the up to c - 1 tokens before it in its own chunk) under
each policy at budgets that are a fraction of T, all in one batch of the engine; the full cache is
the reference. The NLL of every token is grouped by its position, so the table shows *when* a policy
starts to hurt: window-only attention is expected to explode once the first tokens leave the cache,
sinks + window to stay flat, H2O to stay near the full cache.

streaming: one greedy generation far longer than the budget (e.g. 20,000 tokens under 1,024), reporting
the KV blocks the sequence holds as it goes (constant once the budget is reached) and the speed.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

from tqdm import tqdm

from loom.config import CacheConfig, KVPolicyConfig, SchedulerConfig
from loom.eval.corpora import corpus_path, read_corpus
from loom.llm import LLM
from loom.sampling_params import SamplingParams

POLICY_ORDER = ("window", "streaming", "h2o")


def _policy_name(policy: KVPolicyConfig | None) -> str:
    if policy is None:
        return "full"
    extra = f", {policy.sink_tokens} sinks" if policy.kind == "streaming" else (
        f", {policy.recent} recent" if policy.kind == "h2o" else "")
    return f"{policy.kind} {policy.budget}{extra}"


def run_kv_eviction(model: str | None = None, *, weights: str | None = None, corpus: str = "britannica",
                    tokens: int = 2048, budgets: Sequence[float] = (0.1, 0.2, 0.5), sink_tokens: int = 4,
                    bucket: int = 256, kinds: Sequence[str] = POLICY_ORDER, chunk: int = 1,
                    rope_scaling: Any = None, progress: bool = True) -> dict[str, Any]:
    """Per-position NLL of the first ``tokens`` tokens of ``corpus`` under every policy and budget."""
    llm = LLM(model, weights=weights, cache=CacheConfig(), scheduler=SchedulerConfig(max_num_seqs=64),
              rope_scaling=rope_scaling)
    engine = llm.engine
    ids = llm.tokenizer.encode(read_corpus(corpus))[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the corpus has only {len(ids)} tokens")
    settings: dict[str, KVPolicyConfig | None] = {"full": None}
    for fraction in budgets:
        budget = max(sink_tokens + 2, round(fraction * tokens))
        for kind in kinds:
            policy = KVPolicyConfig(kind, budget, sink_tokens=sink_tokens, prefill_chunk=chunk)
            settings[_policy_name(policy)] = policy
    for name, policy in settings.items():
        engine.add_request(name, ids, SamplingParams(max_tokens=1, prompt_logprobs=0, kv_policy=policy))
    nll: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with tqdm(total=tokens, desc="tokens scored (every policy)", unit="tok", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.prompt_logprobs is not None:
                    nll[delta.request_id] = [-entry[t].logprob for t, entry in zip(ids[1:], delta.prompt_logprobs[1:])]
            done = min((s.num_computed for r in engine.requests.values() for s in r.seqs), default=tokens)
            bar.update(done - bar.n)
    seconds = time.perf_counter() - t0
    rows = []
    for name, policy in settings.items():
        values = nll[name]
        buckets = []
        for start in range(0, len(values), bucket):
            chunk = values[start:start + bucket]
            buckets.append({"first_position": start + 1, "last_position": start + len(chunk),
                            "perplexity": math.exp(sum(chunk) / len(chunk))})
        rows.append({"name": name, "policy": "full" if policy is None else policy.kind,
                     "budget": None if policy is None else policy.budget,
                     "budget_fraction": None if policy is None else policy.budget / tokens,
                     "perplexity": math.exp(sum(values) / len(values)), "buckets": buckets})
    return {"model": llm.model_path, "weights": weights or "native (the file's own quantized weights)",
            "corpus": corpus_path(corpus), "tokens": tokens, "tokens_scored": tokens - 1, "bucket": bucket,
            "sink_tokens": sink_tokens, "prefill_chunk": chunk, "seconds": seconds,
            "decode_steps": llm.engine.runner.describe_steps(), "results": rows}


def plot_kv_eviction(result: dict[str, Any], path: str) -> None:
    """Perplexity per position bucket: one panel per budget, one line per policy, the full cache in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in result["results"] if r["budget"] is not None})
    full = next(r for r in result["results"] if r["policy"] == "full")
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), sharey=True, squeeze=False)
    styles = {"full": ("black", "-"), "window": ("tab:red", "--"), "streaming": ("tab:blue", "-"), "h2o": ("tab:green", "-.")}
    for ax, budget in zip(axes[0], budgets):
        for r in [full] + [r for r in result["results"] if r["budget"] == budget]:
            color, style = styles[r["policy"]]
            xs = [(b["first_position"] + b["last_position"]) / 2 for b in r["buckets"]]
            ax.plot(xs, [b["perplexity"] for b in r["buckets"]], style, color=color, marker=".", label=r["policy"])
        ax.axvline(budget, color="grey", lw=0.8, ls=":")
        ax.set_title(f"budget {budget} tokens ({100 * budget / result['tokens']:.0f}%)")
        ax.set_xlabel("position in the text")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"perplexity per {result['bucket']}-token bucket")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, KV eviction: window vs sinks + window (StreamingLLM) vs H2O", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plain_decode_speed(engine: Any, prompt: str, context: int, tokens: int) -> float:
    """Tokens/s of plain decoding (the full paged cache) from ``context`` generated tokens to
    ``context + tokens``."""
    engine.add_request("plain", prompt, SamplingParams(temperature=0, max_tokens=context + tokens, ignore_eos=True,
                                                       kv_policy=KVPolicyConfig("full")))
    generated, start = 0, None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            generated += len(delta.token_ids)
        if start is None and generated >= context:
            start = (time.perf_counter(), generated)
    assert start is not None
    return (generated - start[1]) / (time.perf_counter() - start[0])


def run_streaming(model: str | None = None, *, weights: str | None = None, prompt: str = "The history of England",
                  generate: int = 20000, budget: int = 1024, sink_tokens: int = 4, kind: str = "streaming",
                  every: int = 500, rope_scaling: Any = None, progress: bool = True,
                  plain_reference: bool = True) -> dict[str, Any]:
    """One greedy generation of ``generate`` tokens under a bounded policy, sampling the KV blocks the
    sequence holds every ``every`` tokens; then (``plain_reference``) plain decoding of the same prompt
    in the same process, timed over ``every`` tokens once ``budget`` are held, for the speed the bounded
    cache costs."""
    policy = KVPolicyConfig(kind, budget, sink_tokens=sink_tokens)
    llm = LLM(model, weights=weights, kv_policy=policy, rope_scaling=rope_scaling)
    engine = llm.engine
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=generate, ignore_eos=True))
    seq = engine.requests["s"].seqs[0]
    block_bytes = engine.kv_cache.nbytes // engine.kv_cache.num_blocks
    trace: list[dict[str, Any]] = []
    text: list[str] = []
    generated = last_generated = 0
    t0 = last = time.perf_counter()
    with tqdm(total=generate, desc=f"{kind} {budget}", unit="tok", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            blocks = len(seq.block_table)  # what the sequence holds for the step about to run
            for delta in engine.step():
                generated += len(delta.token_ids)
                text.append(delta.text)
                bar.update(len(delta.token_ids))
            if generated and (generated % every == 0 or not engine.has_unfinished_requests()):
                now = time.perf_counter()
                trace.append({"generated": generated, "kv_blocks": blocks, "kv_bytes": blocks * block_bytes,
                              "tokens_per_s": (generated - last_generated) / (now - last)})
                last, last_generated = now, generated
    seconds = time.perf_counter() - t0
    full_bytes = engine.model.config.kv_bytes_per_token(engine.kv_cache.dtype.itemsize)
    out = "".join(text)
    bounded = [t["tokens_per_s"] for t in trace if t["generated"] > budget + every]
    plain = plain_decode_speed(engine, prompt, budget, every) if plain_reference else None
    return {"model": llm.model_path, "policy": _policy_name(policy), "prompt": prompt, "generated": generated,
            "decode_steps": llm.engine.runner.describe_steps(),
            "seconds": seconds, "tokens_per_s": generated / seconds, "trace": trace,
            # decode speed once the budget is full, against plain decoding (full cache) at the same context
            "bounded_tokens_per_s_at_budget": sum(bounded) / len(bounded) if bounded else None,
            "plain_tokens_per_s_at_budget": plain,
            "kv_bytes_held_at_end": trace[-1]["kv_bytes"],
            "kv_bytes_a_full_cache_would_hold": full_bytes * (generated + len(llm.tokenizer.encode(prompt))),
            "max_position_embeddings": engine.model.config.max_position_embeddings,
            "text_head": out[:400], "text_tail": out[-400:]}

