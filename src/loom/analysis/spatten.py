"""SpAtten cascade token (and head) pruning during prefill, as an experiment (Wang, Zhang and Han,
"SpAtten: Efficient Sparse Attention Architecture with Cascade Token and Head Pruning", HPCA 2021,
arXiv 2012.09852).

Cascade token pruning (SpAtten section III-A): every key token j carries an importance score

    s_j = sum over layers l so far, heads h, queries i of  softmax(q_i k_j / sqrt(d))[l, h, i, j],

the attention probability it has received, accumulated layer after layer. At chosen layers the
tokens with the lowest scores are removed: their hidden states and therefore their keys and values
in that layer and every later one ("cascade": a pruned token never comes back). Here the schedule
is cumulative keep fractions at chosen layer depths; by default three stages at 1/4, 1/2 and 3/4
of the depth, each keeping the same share, k^(1/3), so the last keeps a fraction k of the prompt.

Cascade head pruning (section III-B): head h's importance is the accumulated magnitude of its
attention output, sum over layers and tokens of |o_h|; at head stages the lowest-scoring head
indices are removed from that layer and every later one (their outputs are zeroed before W_o).

Here pruning happens in the prefill of a prompt; the tokens that follow it (the ones scored) are
never pruned and attend, in each layer, to the prompt tokens still alive there, exactly as decoding
over a KV cache pruned the same way would. The prompt's last token is never pruned either (its
logits predict the first scored token). Scores use the prompt's own queries only.

Under a causal mask token j is seen by the queries j..T-1 only, so the summed score favours early
tokens. "importance-mean" divides each layer's sum by the number of prompt queries that see the
token (the mean attention it receives), an ablation not in the paper.

Baselines on the same schedule: "random" (uniformly random tokens) and "recent" (the latest tokens
plus the first four, StreamingLLM's attention sinks) instead of the accumulated importance.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

SCORERS = ("importance", "importance-mean", "random", "recent")


@dataclass(frozen=True)
class SpAttenConfig:
    """keep: fraction of the prunable prompt tokens left after the last token stage.
    stages: layer depths (fractions of the layer count) where tokens are pruned.
    head_keep / head_stages: the same for query heads (head_keep 1.0: no head pruning).
    scorer: "importance" (SpAtten), "importance-mean" (per-query mean), "random" or "recent" (baselines).
    sinks: first tokens "recent" keeps."""

    keep: float = 1.0
    stages: tuple[float, ...] = (0.25, 0.5, 0.75)
    head_keep: float = 1.0
    head_stages: tuple[float, ...] = (0.5,)
    scorer: str = "importance"
    sinks: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1 or not 0 < self.head_keep <= 1:
            raise ValueError(f"keep fractions must be in (0, 1], got {self.keep}, {self.head_keep}")
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}; choose one of {', '.join(SCORERS)}")
        if any(not 0 <= s < 1 for s in (*self.stages, *self.head_stages)):
            raise ValueError("stages are fractions of the depth in [0, 1)")


def schedule(num_layers: int, stages: Sequence[float], keep: float) -> dict[int, float]:
    """{layer: cumulative keep fraction before that layer}: stage i of n keeps keep^(i/n)."""
    layers = sorted({min(num_layers - 1, int(round(s * num_layers))) for s in stages})
    n = len(layers)
    return {layer: keep ** ((i + 1) / n) for i, layer in enumerate(layers)} if keep < 1 else {}


def attention_probs(model: Transformer, layer: int, h: torch.Tensor, positions: torch.Tensor,
                    rows: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) [Hq, rows, T] of layer ``layer`` for its first ``rows`` queries over all
    T tokens of ``h`` (causal by position; GQA: query head i reads KV head i // (Hq / Hkv))."""
    block = model.layers[layer]
    attn = block.attn
    x = block.attn_norm(h) if block.pre_norm else h
    qkv = attn.qkv_proj(x).view(h.shape[0], attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim)
    qk = attn.rotary.apply(qkv[:, : attn.num_heads + attn.num_kv_heads],
                           attn.rotary.prepare(positions, h.dtype)) if attn.rotary is not None else qkv
    q = qk[:rows, : attn.num_heads].transpose(0, 1).float()
    k = qk[:, attn.num_heads: attn.num_heads + attn.num_kv_heads].transpose(0, 1).float()
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=0)
    scores = q @ k.transpose(1, 2) * attn.scale
    future = positions[None, :] > positions[:rows, None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@dataclass
class PrunedPrefill:
    logits: torch.Tensor  # [tail, vocab]: rows of the last prompt token and the tokens after it
    tokens_per_layer: list[int]  # tokens alive in each layer (prompt + tail)
    heads_per_layer: list[int]
    token_scores: list[torch.Tensor]  # accumulated importance of the prompt tokens alive, before each stage
    kept_positions: torch.Tensor  # prompt positions alive in the last layer


def pruned_forward(model: Transformer, ids: torch.Tensor, prompt_len: int, config: SpAttenConfig) -> PrunedPrefill:
    """Run ``ids`` (prompt of ``prompt_len`` tokens, then the tail) with SpAtten pruning of the prompt.

    Returns the logits of positions prompt_len - 1 .. len(ids) - 2 (they predict the tail tokens).
    With keep = head_keep = 1 this is the model's own forward, operation for operation.
    """
    n_layers, n_heads = model.config.num_layers, model.config.num_heads
    token_plan = schedule(n_layers, config.stages, config.keep)
    head_plan = schedule(n_layers, config.head_stages, config.head_keep)
    prunable = prompt_len - 1  # the last prompt token and the tail stay
    token_score = torch.zeros(prompt_len, dtype=torch.float64)  # indexed by position
    head_score = torch.zeros(n_heads, dtype=torch.float64)
    heads_alive = torch.ones(n_heads, dtype=torch.bool)
    gen = torch.Generator().manual_seed(config.seed)
    random_score = torch.rand(prompt_len, generator=gen, dtype=torch.float64)
    positions = torch.arange(ids.numel())
    tokens_per_layer, heads_per_layer, snapshots = [], [], []
    last_stage = max(token_plan) if token_plan else -1
    with torch.inference_mode():
        h = model.embed(ids, positions)
        for i, block in enumerate(model.layers):
            if i in token_plan:
                alive = positions[positions < prunable]
                n_keep = max(1, int(round(token_plan[i] * prunable)))
                if n_keep < alive.numel():
                    snapshots.append(token_score[alive].clone())
                    ranking = _ranking(config, alive, token_score, random_score)
                    kept = alive[ranking.topk(n_keep).indices].sort().values
                    rows = torch.cat([torch.searchsorted(positions, kept), torch.arange(alive.numel(), positions.numel())])
                    h, positions = h[rows], positions[rows]
            if i in head_plan:
                n_keep_heads = max(1, int(round(head_plan[i] * n_heads)))
                scores = head_score.masked_fill(~heads_alive, -math.inf)
                heads_alive = torch.zeros(n_heads, dtype=torch.bool)
                heads_alive[scores.topk(n_keep_heads).indices] = True
            prompt_rows = int((positions < prompt_len).sum())
            if config.scorer.startswith("importance") and i < last_stage:
                probs = attention_probs(model, i, h, positions, prompt_rows)
                received = probs.sum(dim=(0, 1))[:prompt_rows].double()
                if config.scorer == "importance-mean":  # prompt query rows prompt_rows - 1 .. j see key row j
                    received /= torch.arange(prompt_rows, 0, -1, dtype=torch.float64)
                token_score[positions[:prompt_rows]] += received
            hook = _head_hook(block.attn, heads_alive, head_score, prompt_rows,
                              track=config.head_keep < 1 and i < max(head_plan, default=-1))
            meta = AttentionMetadata(positions=positions, query_start=[0, positions.numel()],
                                     context_lens=[positions.numel()])
            rope = model.rotary.prepare(positions, h.dtype) if model.rotary is not None else None
            try:
                h = block(h, meta, None, rope)
            finally:
                if hook is not None:
                    hook.remove()
            tokens_per_layer.append(positions.numel())
            heads_per_layer.append(int(heads_alive.sum()))
        h = h if model.norm is None else model.norm(h)
        tail_rows = torch.searchsorted(positions, torch.arange(prompt_len - 1, ids.numel() - 1))
        logits = model.compute_logits(h[tail_rows])
    return PrunedPrefill(logits, tokens_per_layer, heads_per_layer, snapshots, positions[positions < prunable])


def _ranking(config: SpAttenConfig, alive: torch.Tensor, importance: torch.Tensor,
             random_score: torch.Tensor) -> torch.Tensor:
    """Higher is kept: accumulated importance, a fixed random draw, or recency (sinks first)."""
    if config.scorer.startswith("importance"):
        return importance[alive]
    if config.scorer == "random":
        return random_score[alive]
    recency = alive.double()
    return torch.where(alive < config.sinks, recency + 1e9, recency)


def _head_hook(attn: torch.nn.Module, alive: torch.Tensor, head_score: torch.Tensor, prompt_rows: int,
               track: bool) -> Any:
    """Before W_o: add each head's output magnitude over the prompt rows to ``head_score`` (if ``track``)
    and zero the outputs of pruned heads. None when there is nothing to do."""
    if alive.all() and not track:
        return None

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        o = inputs[0].view(inputs[0].shape[0], attn.num_heads, attn.head_dim)
        if track:
            head_score.add_(o[:prompt_rows].abs().sum(dim=(0, 2)).double().cpu())
        if not alive.all():
            o = o * alive.to(o.dtype)[None, :, None]
        return (o.reshape(inputs[0].shape),)

    return attn.o_proj.register_forward_pre_hook(hook)


def savings(tokens_per_layer: Sequence[int], heads_per_layer: Sequence[int], full_tokens: int, tail: int,
            num_heads: int) -> dict[str, float]:
    """Fractions of the unpruned cost that remain, from the tokens and heads alive per layer.

    kv: KV cache entries the prompt leaves for decoding (and attention reads per decoded token);
    prefill_attention: q k^T and p v work of the prefill, ~ heads x tokens^2 per layer;
    prefill_linear: projections and MLP of the prefill, ~ tokens per layer.
    """
    layers = len(tokens_per_layer)
    prompt = [t - tail for t in tokens_per_layer]
    full_prompt = full_tokens - tail
    return {
        "kv_fraction": sum(prompt) / (layers * full_prompt),
        "prefill_attention_fraction": sum(h * t * t for h, t in zip(heads_per_layer, tokens_per_layer))
        / (layers * num_heads * full_tokens ** 2),
        "prefill_linear_fraction": sum(tokens_per_layer) / (layers * full_tokens),
    }


def tail_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over the rows (fp32 log-softmax, fp64 sum)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, targets[:, None]).double().sum().item()


def run_spatten(model_path: str | None = None, *, window: int = 1024, tail: int = 64, windows: int = 16,
                keeps: Sequence[float] = (0.75, 0.5, 0.25), scorers: Sequence[str] = SCORERS,
                head_keeps: Sequence[float] = (), corpus: str = "britannica", weights: str = "fp32",
                progress: bool = True) -> dict[str, Any]:
    """Score the last ``tail`` tokens of ``windows`` windows of ``window`` tokens, the prompt before
    them pruned with every (scorer, keep) and with head pruning at each of ``head_keeps`` (SpAtten's
    importance, tokens unpruned); report mean tail NLL, its change against no pruning (paired, with
    a standard error over windows) and the cost fractions that remain."""
    from loom.eval.perplexity import load_for_eval
    from loom.eval.corpora import corpus_path, read_corpus

    if tail < 1 or window <= tail + 1:
        raise ValueError("need 1 <= tail < window - 1")
    loaded, tokenizer = load_for_eval(model_path, weights=weights)
    model = loaded.model
    ids = torch.tensor(tokenizer.encode(read_corpus(corpus_path(corpus))), dtype=torch.long)
    if ids.numel() < window * windows:
        raise ValueError(f"{ids.numel()} tokens are too few for {windows} windows of {window}")
    configs: dict[str, SpAttenConfig] = {"none": SpAttenConfig()}
    for s in scorers:
        for k in keeps:
            if k < 1:
                configs[f"{s} keep {k:g}"] = SpAttenConfig(keep=k, scorer=s)
    for hk in head_keeps:
        if hk < 1:
            configs[f"heads keep {hk:g}"] = SpAttenConfig(head_keep=hk)
    prompt_len = window - tail
    nll: dict[str, list[float]] = {name: [] for name in configs}
    cost: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    with tqdm(total=windows * len(configs), desc=f"spatten (L={window})", unit="run", disable=not progress) as bar:
        for w in range(windows):
            x = ids[w * window:(w + 1) * window]
            for name, cfg in configs.items():
                out = pruned_forward(model, x, prompt_len, cfg)
                nll[name].append(tail_nll(out.logits, x[prompt_len:]))
                cost[name] = savings(out.tokens_per_layer, out.heads_per_layer, window, tail,
                                     model.config.num_heads)
                bar.update(1)
    base = torch.tensor(nll["none"], dtype=torch.float64) / tail
    rows = []
    for name, cfg in configs.items():
        per = torch.tensor(nll[name], dtype=torch.float64) / tail
        delta = per - base
        rows.append({"name": name, **asdict(cfg), "mean_nll": float(per.mean()), "perplexity": math.exp(per.mean()),
                     "delta_nll": float(delta.mean()),
                     "delta_nll_stderr": float(delta.std() / math.sqrt(windows)) if windows > 1 else None,
                     **cost[name]})
    return {"model": loaded.path, "weights": weights, "corpus": corpus, "window": window, "tail": tail,
            "windows": windows, "prompt_tokens": prompt_len, "seconds": time.perf_counter() - t0,
            "results": rows}


def format_spatten(result: dict[str, Any]) -> str:
    lines = ["| setting | tail NLL | ppl | dNLL vs none (+- s.e.) | KV left | prefill attn FLOPs left | prefill linear FLOPs left |",
             "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        se = f" +- {r['delta_nll_stderr']:.3f}" if r["delta_nll_stderr"] is not None else ""
        lines.append(f"| {r['name']} | {r['mean_nll']:.3f} | {r['perplexity']:.2f} | {r['delta_nll']:+.3f}{se} | "
                     f"{100 * r['kv_fraction']:.0f}% | {100 * r['prefill_attention_fraction']:.0f}% | "
                     f"{100 * r['prefill_linear_fraction']:.0f}% |")
    return "\n".join(lines)
