"""Checks on what a model file claims, made before anything is sized from it.

A GGUF header or a config.json is only a claim: a number in it may be absurd (a context of 2^32 tokens),
not a number at all (null, NaN), or disagree with the tensors the file holds (2^31 layers, a vocabulary of
2^31 for a 256-row embedding). Loaders read each value through ``checked_int`` / ``checked_number`` and
compare the config with the stored tensors (``check_layer_count``, ``check_tensor_shapes``), so that what
is allocated afterwards is bounded by what the file actually holds. Every failure is a ``WeightsError``
naming the file and the key or tensor at fault.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

from loom.config import MAX_CONTEXT, ModelConfig
from loom.weights.errors import WeightsError

MAX_LAYERS = 4096  # a config's layer count before it is checked against the tensors (the deepest released: ~130)
MAX_ROPE_BASE = 1e12  # far above any released model's RoPE base (Llama 3: 5e5; 1M-context fine-tunes: ~4e9)

Shape = Sequence[int | None]  # None: a size the stored form does not say (a packed quantized tensor's columns)


def show(value: Any) -> str:
    """A metadata value as an error message quotes it (lists and strings cut short)."""
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(noun: str, low: float | None, high: float | None, above: float | None = None) -> str:
    """What a checked value should have been, in words: "a positive integer", "a finite number above 1 and
    at most 1e+12", ..."""
    if above == 0 and low is None and high is None:
        return f"a positive {noun}"
    if low == 1 and high is None and above is None and noun == "integer":
        return "a positive integer"
    if low == 0 and high is None and above is None:
        return f"a non-negative {noun}"
    if low is not None and high is not None:
        bounds = [f"between {_num(low)} and {_num(high)}"]
    else:
        bounds = [f"at least {_num(low)}"] if low is not None else []
        bounds += [f"above {_num(above)}"] if above is not None else []
        bounds += [f"at most {_num(high)}"] if high is not None else []
    article = "an" if noun[0] in "aeiou" else "a"
    return f"{article} {noun}" + (" " + " and ".join(bounds) if bounds else "")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def checked_int(value: Any, what: str, path: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int, if it is a whole number in [low, high]; else a WeightsError naming ``what``."""
    whole = ((isinstance(value, int) and not isinstance(value, bool))
             or (isinstance(value, float) and value.is_integer()))
    if not whole or value < low or (high is not None and value > high):
        raise WeightsError(path, f"{what} is {show(value)}; expected {_expected('integer', low, high)}")
    return int(value)


def checked_number(value: Any, what: str, path: str, low: float | None = None, high: float | None = None,
                   above: float | None = None) -> float:
    """``value`` as a float, if it is a finite number >= low (or > above) and <= high; else a WeightsError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if (not number or (low is not None and value < low) or (above is not None and value <= above)
            or (high is not None and value > high)):
        raise WeightsError(path, f"{what} is {show(value)}; expected {_expected('finite number', low, high, above)}")
    return float(value)


def check_scaled_context(context: int, what: str, path: str) -> None:
    """Refuse a context that RoPE scaling (``what``: the factor's key) stretched past MAX_CONTEXT."""
    if context > MAX_CONTEXT:
        raise WeightsError(path, f"{what} scales the context to {context:.3g} tokens; loom supports at most "
                                 f"{MAX_CONTEXT} (2^24)")


def layer_indices(names: Iterable[str], prefix: str) -> set[int]:
    """The layer numbers N of the tensors named ``{prefix}N.<anything>``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for m in map(pattern.match, names) if m}


def check_layer_count(count: int, present: set[int], what: str, prefix: str, path: str) -> None:
    """The config's layer count (``what``) must be the number of layers whose tensors the file holds,
    numbered 0 .. count - 1: a count is never trusted beyond the tensors that back it."""
    if len(present) == count and present == set(range(count)):
        return
    if not present:
        held = f"no {prefix}N tensors"
    elif present == set(range(len(present))):
        held = f"tensors for {len(present)} layers ({prefix}0 to {prefix}{len(present) - 1})"
    else:
        numbers = sorted(present)
        listed = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        held = f"tensors for layers {listed}"
    raise WeightsError(path, f"{what} is {count}, but the file holds {held}")


def parameter_part_shapes(config: ModelConfig, parameter: str) -> list[tuple[int, ...]] | None:
    """The shapes of the stored parts (q, k, v; gate, up; or the one tensor) that make loom's
    ``parameter`` (or an MoE layer's router, experts and shared expert), in [out, in] order; None for a parameter
    not listed here."""
    h, v, f, e = config.hidden_size, config.vocab_size, config.intermediate_size, config.embedding_size
    q, kv = config.q_size, config.kv_size
    name = parameter.split(".", 2)[2] if parameter.startswith("layers.") else parameter
    shapes: dict[str, list[tuple[int, ...]]] = {
        "embed_tokens.weight": [(v, e)], "lm_head.weight": [(v, e)],
        "pos_embed.weight": [(config.max_position_embeddings + config.position_offset, h)],
        "project_in.weight": [(h, e)], "project_out.weight": [(e, h)],
        "attn.qkv_proj.weight": [(q, h), (kv, h), (kv, h)], "attn.qkv_proj.bias": [(q,), (kv,), (kv,)],
        "attn.o_proj.weight": [(h, config.attn_out_size)], "attn.o_proj.bias": [(h,)],
        "mlp.gate_up_proj.weight": [(f, h), (f, h)], "mlp.gate_up_proj.bias": [(f,), (f,)],
        "mlp.up_proj.weight": [(f, h)], "mlp.up_proj.bias": [(f,)],
        "mlp.down_proj.weight": [(h, f)], "mlp.down_proj.bias": [(h,)],
    }
    for norm in ("norm", "attn_norm", "mlp_norm", "embed_norm"):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = [(h,)]
    if config.num_experts:  # an MoE layer's MLP (layers/moe.py), every expert alike
        n, fm, fs = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
        shapes.update({
            "mlp.router.weight": [(n, h)], "mlp.experts.*.gate_up_proj.weight": [(fm, h), (fm, h)],
            "mlp.experts.*.down_proj.weight": [(h, fm)], "mlp.shared_expert.gate_up_proj.weight": [(fs, h), (fs, h)],
            "mlp.shared_expert.down_proj.weight": [(h, fs)], "mlp.shared_expert_gate.weight": [(1, h)]})
        name = re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.*.", name)
    if config.num_experts and config.moe_score_bias:
        shapes["mlp.score_bias"] = [(config.num_experts,)]
    if config.is_mla:  # layers/mla.py
        heads, r, rq = config.num_heads, config.kv_lora_rank, config.q_lora_rank
        kv_a, kv_b = r + config.qk_rope_head_dim, heads * (config.qk_nope_head_dim + config.v_head_dim)
        shapes.update({
            "attn.q_proj.weight": [(q, h)], "attn.q_a_proj.weight": [(rq, h)], "attn.q_a_proj.bias": [(rq,)],
            "attn.q_a_norm.weight": [(rq,)], "attn.q_b_proj.weight": [(q, rq)], "attn.kv_a_proj.weight": [(kv_a, h)],
            "attn.kv_a_proj.bias": [(kv_a,)], "attn.kv_a_norm.weight": [(r,)], "attn.kv_b_proj.weight": [(kv_b, r)]})
    if config.qk_norm_full:
        shapes.update({"attn.qk_norm_full.q.weight": [(q,)], "attn.qk_norm_full.k.weight": [(kv,)]})
    return shapes.get(name)


def check_tensor_shapes(config: ModelConfig, sources: dict[str, list[str]], shape_of: Callable[[str], Shape],
                        path: str) -> None:
    """Every stored tensor named in ``sources`` (loom parameter -> stored parts) exists and has the shape the
    config gives it; ``shape_of`` raises a WeightsError for a missing tensor. Called before the model is
    built, so that each size the model allocates is one a stored tensor has."""
    for parameter, parts in sources.items():
        wanted = parameter_part_shapes(config, parameter)
        if wanted is None:
            continue
        if len(parts) == 1 and len(wanted) > 1:  # stored fused (GPT-2's c_attn, BLOOM's query_key_value)
            wanted = [(sum(w[0] for w in wanted), *wanted[0][1:])]
        for name, want in zip(parts, wanted):
            stored = tuple(shape_of(name))
            if len(stored) != len(want) or any(s is not None and s != w for s, w in zip(stored, want)):
                raise WeightsError(path, f"shape {_shape(stored)} does not match the config's {want}", name)


def _shape(shape: Shape) -> str:
    sizes = ["?" if s is None else str(s) for s in shape]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
