"""`loom bench moe`: a random mixture-of-experts model against the dense model with the same active parameters.

The MoE model has ``experts`` SwiGLU experts of ``moe_ff`` per layer, ``top_k`` per token; the dense model is
the same model (vocabulary, attention, layers) with one SwiGLU MLP of ``top_k * moe_ff``, so a token runs
through as many weights in both (the router's [E, hidden] aside). Both run through loom's engine (the
paged KV cache, the scheduler and the decode step the engine picks: the scripted step on a CPU):

    prefill tokens/s   ``batch`` prompts of ``prompt_len`` random tokens, prefilled in one engine step
    decode tokens/s    then ``gen_len - 1`` decode steps of ``batch`` rows

The two engines take turns, run after run; the best run of each is kept. Decoding reads weights: a batch of
B rows reads the experts its B k (row, expert) pairs chose, up to all E of them, where the dense model reads
one MLP. Prefill is compute: both do the same FLOPs in matmuls, the MoE's split into E smaller ones, plus
its dispatch.

The dispatch overhead is named on one MoE layer (layers/moe.py: MoE.forward, step by step) for 1 token
(a decode), ``batch`` tokens and ``batch * prompt_len`` tokens (a prefill): the router (its matmul,
softmax, top-k), the plan (bincount, sort of the pairs), the gather of the rows in expert order, the expert
matmuls (the loop over experts with rows), and the combine (scale, index_add back), next to the dense MLP
on the same tokens. dispatch = router + plan + gather + combine.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import torch

from loom.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from loom.engine.engine import LLMEngine
from loom.layers.mlp import GatedMLP
from loom.layers.moe import MoE, route
from loom.models.transformer import Transformer
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer, tokenizer_from_gguf_metadata


def _byte_tokens() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level tokenizer for a random model of ``vocab`` >= 256 ids: the 256 bytes, then control tokens."""
    tokens = _byte_tokens() + [f"<|t{i}|>" for i in range(vocab - 256)]
    return tokenizer_from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": [1] * 256 + [3] * (vocab - 256), "tokenizer.ggml.eos_token_id": 1})


def bench_configs(hidden: int, layers: int, heads: int, kv_heads: int, experts: int, top_k: int, moe_ff: int,
                  vocab: int, shared_ff: int = 0) -> tuple[ModelConfig, ModelConfig]:
    """(the MoE config, the dense config with a top_k * moe_ff MLP (+ the shared expert's width))."""
    base = dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                max_position_embeddings=4096, name="random")
    moe = ModelConfig(**base, intermediate_size=moe_ff, num_experts=experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=moe_ff, shared_expert_intermediate_size=shared_ff)
    dense = ModelConfig(**base, intermediate_size=top_k * moe_ff + shared_ff)
    return moe, dense


def _best_seconds(fns: dict[str, Callable[[], Any]], budget: float = 1.0, min_rounds: int = 5) -> dict[str, float]:
    """The fastest call of each of ``fns``, timed in rounds (each function once per round, for as many rounds as
    fit in ``budget`` seconds, at least ``min_rounds``), so that a busy spell of the machine slows all alike."""
    for fn in fns.values():  # warm-up
        fn()
    best = {name: float("inf") for name in fns}
    spent, rounds = 0.0, 0
    while rounds < min_rounds or spent < budget:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[name], spent = min(best[name], dt), spent + dt
        rounds += 1
    return best


@torch.inference_mode()
def dispatch_breakdown(moe: MoE, dense: GatedMLP, tokens: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds of one MoE layer's forward on ``tokens`` random rows, part by part, and of the dense MLP."""
    x = torch.randn(tokens, moe.router.in_features, generator=torch.Generator().manual_seed(seed)).to(
        moe.router.weight.dtype)
    weights, chosen = route(moe.router(x), moe.top_k, moe.normalize)
    flat = chosen.reshape(-1)
    counts = torch.bincount(flat, minlength=moe.num_experts)
    order = torch.argsort(flat, stable=True)
    rows = torch.div(order, moe.top_k, rounding_mode="floor")
    xs = x.index_select(0, rows)
    ys = torch.empty_like(xs)

    def experts() -> None:
        start = 0
        for e, end in enumerate(counts.cumsum(0).tolist()):
            if end > start:
                ys[start:end] = moe.experts[e](xs[start:end])
            start = end

    def combine() -> torch.Tensor:
        scaled = ys * weights.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, rows, scaled)

    def plan() -> None:
        f = chosen.reshape(-1)
        c = torch.bincount(f, minlength=moe.num_experts)
        o = torch.argsort(f, stable=True)
        torch.div(o, moe.top_k, rounding_mode="floor")
        c.cumsum(0).tolist()

    seconds = _best_seconds({
        "router": lambda: route(moe.router(x), moe.top_k, moe.normalize), "plan": plan,
        "gather": lambda: x.index_select(0, rows), "experts": experts, "combine": combine,
        "moe_layer": lambda: moe(x), "dense_mlp": lambda: dense(x)})
    ms: dict[str, float] = {k: v * 1e3 for k, v in seconds.items()}
    ms["dispatch"] = ms["router"] + ms["plan"] + ms["gather"] + ms["combine"]
    ms["other"] = ms["moe_layer"] - ms["dispatch"] - ms["experts"]  # what the parts timed alone do not show
    ms["dispatch_fraction_of_moe_layer"] = ms["dispatch"] / ms["moe_layer"]
    ms["experts_hit"] = int((counts > 0).sum())
    moe.reset_counts()
    return ms


def engine_speeds(models: dict[str, Transformer], tokenizer: Tokenizer, batch: int, prompt_len: int, gen_len: int,
                  repeats: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Best prefill and decode tokens/s of ``repeats`` runs of ``batch`` random prompts through each model's engine,
    the models taking turns (a run of one, then of the next), so that a busy spell of the machine slows all alike."""
    blocks = batch * (-(-(prompt_len + gen_len) // 16) + 1)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=blocks, enable_prefix_caching=False),
                          scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len))
    engines = {name: LLMEngine(m, tokenizer, config) for name, m in models.items()}
    gen = torch.Generator().manual_seed(seed)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    params = SamplingParams(temperature=0, max_tokens=gen_len, min_tokens=gen_len, ignore_eos=True)
    vocab = min(m.config.vocab_size for m in models.values())
    for r in range(repeats + 1):  # the first run warms up
        prompts = [torch.randint(256, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        for name, engine in engines.items():
            for b, ids in enumerate(prompts):
                engine.add_request(f"{r}-{b}", ids, params)
            t0 = time.perf_counter()
            engine.step()  # every prompt, in one step
            t1 = time.perf_counter()
            steps = 0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            t2 = time.perf_counter()
            if r:
                prefill[name].append(batch * prompt_len / (t1 - t0))
                decode[name].append(batch * steps / (t2 - t1))
    return {name: {"prefill_tokens_per_s": max(prefill[name]), "decode_tokens_per_s": max(decode[name]),
                   "decode_tokens_per_s_runs": decode[name], "decode_step": e.runner.last_decode_step,
                   "decode_steps": e.runner.describe_steps()} for name, e in engines.items()}


def run_moe_bench(hidden: int = 512, layers: int = 4, heads: int = 8, kv_heads: int = 2, experts: int = 8,
                  top_k: int = 2, moe_ff: int = 512, shared_ff: int = 0, vocab: int = 1024, batch: int = 4,
                  prompt_len: int = 128, gen_len: int = 32, repeats: int = 3, dtype: str = "float32",
                  seed: int = 0) -> dict[str, Any]:
    """The MoE model against its dense twin: engine speed and the dispatch breakdown (module docstring)."""
    if vocab < 256:
        raise ValueError("--vocab must be at least 256 (the byte tokens)")
    if gen_len < 2 or prompt_len < 1 or batch < 1 or repeats < 1:
        raise ValueError("need --gen-len >= 2 and positive --prompt-len, --batch, --repeats")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    moe_cfg, dense_cfg = bench_configs(hidden, layers, heads, kv_heads, experts, top_k, moe_ff, vocab, shared_ff)
    tokenizer = byte_tokenizer(vocab)
    models = {"moe": Transformer(moe_cfg, torch_dtype).init_random(seed),
              "dense": Transformer(dense_cfg, torch_dtype).init_random(seed)}
    for layer in models["moe"].layers:  # routers that depend on the token (0.02 would route almost uniformly)
        layer.mlp.router.weight.data.normal_(0, 1.0 / hidden ** 0.5, generator=torch.Generator().manual_seed(seed))
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cores": os.cpu_count()},
        "settings": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "experts": experts,
                     "top_k": top_k, "moe_ff": moe_ff, "shared_ff": shared_ff, "dense_ff": dense_cfg.intermediate_size,
                     "vocab": vocab, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                     "repeats": repeats, "dtype": dtype},
        "parameters": {"moe_total": moe_cfg.num_parameters(), "moe_active": moe_cfg.num_parameters(active=True),
                       "dense": dense_cfg.num_parameters()},
    }
    result["engine"] = engine_speeds(models, tokenizer, batch, prompt_len, gen_len, repeats, seed)
    e = result["engine"]
    result["moe_over_dense"] = {k: e["moe"][k] / e["dense"][k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    moe_layer, dense_mlp = models["moe"].layers[0].mlp, models["dense"].layers[0].mlp
    result["dispatch_ms"] = {str(t): dispatch_breakdown(moe_layer, dense_mlp, t, seed)
                             for t in sorted({1, batch, batch * prompt_len})}
    return result
