"""Per-operator FLOPs, memory operations and arithmetic intensity of a decoder forward (seed 002).

Seed 002 counts, for every operator,

    FLOPs = floating-point multiplies and adds (a matmul [m x k] @ [k x n] is 2 m k n),
    MOPs  = sum over the operator's input and output tensors of their element counts,
    arithmetic intensity = FLOPs / MOPs  (FLOP per element; divide by bytes per element for FLOP/byte),

and shows that an operator over n new tokens has intensity ~2n: decode (n = 1) sits near 2 and is
memory-bound on any GPU, prefill is compute-bound. Its three tables are matmuls:

    MHA (casting)     [n x d]   @ [d x d]      2 n d^2       (2n + d) d              AI = 2d / (2 + d/n)
    MHA (act-to-act)  [n x d/h] @ [d/h x l]    2 n d l / h   (n + l) d/h + n l       AI = 2dl / (dl/n + d + lh)
    FFN               [n x d]   @ [d x n_ff]   2 n d n_ff    d (n + n_ff) + n n_ff   AI = 2 d n_ff / (d n_ff/n + d + n_ff)

``matmul`` is that count; ``forward_ops`` applies it (and elementwise counts for norms, RoPE,
softmax, activations, residuals) to every operator of a ``ModelConfig``'s forward:

- GQA: q_proj is [d x h*hd], k_proj and v_proj [d x kv*hd]. The act-to-act matmuls run once per
  KV head over the g = h / kv query heads sharing it: [g n x hd] @ [hd x l], so the K and V cache is
  read once per KV head, not once per query head (for MHA, g = 1: seed 002's per-head matmul).
- SwiGLU: gate and up [d x n_ff] and down [n_ff x d] (three matmuls; seed 002's FFN row has two).
- The scores cover the whole [n x l] rectangle, as seed 002 counts them (a causal mask makes about
  half of a fresh prefill's scores unnecessary; kernels that skip them do fewer FLOPs). A sliding
  window bounds the keys at min(l, window + n - 1).
- Prefill returns logits for the last position only (what an engine samples from); decode for each
  sequence. ``logit_rows`` overrides that.

Elementwise FLOPs per element (conventions; their MOPs follow seed 002's definition): RMSNorm 4
(square, sum, scale, weight) + 3 per row; LayerNorm 7 + 4 per row; RoPE 3; softmax 5 (scale,
subtract max, exp, sum, divide); SiLU 4, GELU 8, ReLU 1, plus 1 for the gate product; residual 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from loom.analysis.presets import Hardware, Precision
from loom.config import ModelConfig

Kind = Literal["weight", "kv", "act"]
Phase = Literal["prefill", "decode"]

GROUPS: dict[str, str] = {
    "attn_proj": "attention projections",
    "attn_act": "attention act-to-act matmuls",
    "ffn": "FFN projections",
    "norm": "norms",
    "lm_head": "lm_head",
    "other": "other (embedding, RoPE, softmax, activation, residual)",
}

ACTIVATION_FLOPS = {"silu": 4, "gelu": 8, "gelu_tanh": 8, "relu": 1}


@dataclass(frozen=True)
class Operand:
    """One input or output tensor of an operator: its element count and what kind of memory holds it."""

    elements: float
    kind: Kind = "act"


@dataclass(frozen=True)
class OpCost:
    """One operator; ``flops`` and the operands are per instance, ``count`` instances per forward."""

    name: str
    group: str
    shape: str
    flops: float
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    count: int = 1
    matmul_flops: float = 0.0  # the 2 m k n part of ``flops`` (bias adds excluded)

    @property
    def mops(self) -> float:
        """Seed 002's memory operations: elements of every input and output tensor."""
        return sum(o.elements for o in self.inputs) + sum(o.elements for o in self.outputs)

    @property
    def stored_elements(self) -> float:
        """Elements read from weights or the KV cache (the part of MOPs that does not shrink with n)."""
        return sum(o.elements for o in self.inputs if o.kind != "act")

    @property
    def intensity(self) -> float:
        """FLOP per element (seed 002's arithmetic intensity)."""
        return self.flops / self.mops if self.mops else float("inf")

    def bytes(self, precision: Precision) -> float:
        return sum(o.elements * precision.bytes_of(o.kind) for o in (*self.inputs, *self.outputs))

    @property
    def total_flops(self) -> float:
        return self.flops * self.count

    @property
    def total_matmul_flops(self) -> float:
        return self.matmul_flops * self.count

    @property
    def total_mops(self) -> float:
        return self.mops * self.count

    @property
    def total_stored_elements(self) -> float:
        return self.stored_elements * self.count


def matmul(m: float, k: float, n: float, name: str = "matmul", group: str = "other", b_kind: Kind = "weight",
           count: int = 1, bias: bool = False) -> OpCost:
    """[m x k] @ [k x n] (+ bias): FLOPs 2mkn (+ mn), MOPs mk + kn + mn (+ n). Seed 002's operator count."""
    inputs = [Operand(m * k), Operand(k * n, b_kind)]
    flops = 2.0 * m * k * n
    if bias:
        inputs.append(Operand(n, "weight"))
    return OpCost(name, group, f"[{m:g} x {k:g}] @ [{k:g} x {n:g}]", flops + (m * n if bias else 0.0),
                  tuple(inputs), (Operand(m * n),), count, flops)


def elementwise(name: str, group: str, shape: str, flops: float, inputs: list[Operand], outputs: list[Operand],
                count: int = 1) -> OpCost:
    return OpCost(name, group, shape, float(flops), tuple(inputs), tuple(outputs), count, 0.0)


def _norm(config: ModelConfig, name: str, rows: float, count: int) -> OpCost:
    d = config.hidden_size
    per_elem, per_row = (4, 3) if config.norm == "rmsnorm" else (7, 4)
    params = [Operand(d, "weight")] + ([Operand(d, "weight")] if config.norm_bias else [])
    return elementwise(name, "norm", f"[{rows:g} x {d}]", per_elem * rows * d + per_row * rows,
                       [Operand(rows * d), *params], [Operand(rows * d)], count)


def forward_ops(config: ModelConfig, phase: Phase = "prefill", n: int = 1, l: int | None = None,
                logit_rows: int | None = None) -> list[OpCost]:
    """Every operator of one forward step, with FLOPs and MOPs per instance and instance counts.

    prefill: one sequence, ``n`` new tokens attending over ``l`` keys (l >= n; l - n already cached;
    default l = n). decode: ``n`` sequences, one new token each, each over ``l`` keys (default 1).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if config.is_mla:
        raise ValueError("the roofline does not model latent attention's operators yet (layers/mla.py); "
                         "loom analyze memory does")
    if phase == "prefill":
        l = n if l is None else l
        if l < n:
            raise ValueError(f"prefill of n={n} tokens needs a context l >= n, got l={l}")
        seqs, q_rows = 1, n
        logit_rows = 1 if logit_rows is None else logit_rows
    elif phase == "decode":
        l = 1 if l is None else l
        if l < 1:
            raise ValueError(f"l must be at least 1, got {l}")
        seqs, q_rows = n, 1
        logit_rows = n if logit_rows is None else logit_rows
    else:
        raise ValueError(f"phase must be prefill or decode, got {phase!r}")
    c = config
    t, d, f, hd = n, c.hidden_size, c.intermediate_size, c.head_dim
    nl = c.num_layers
    g = c.queries_per_kv
    e = c.embedding_size  # the embedding's width (OPT-350m: narrower, projected in and out)
    ops: list[OpCost] = [elementwise("embedding", "other", f"{t:g} rows of [{c.vocab_size} x {e}]", 0,
                                     [Operand(t), Operand(t * e, "weight")], [Operand(t * e)])]
    if e != d:
        ops.append(matmul(t, e, d, "project_in", "other"))
    if c.position in ("learned", "sinusoidal"):
        kind: Kind = "weight" if c.position == "learned" else "act"
        ops.append(elementwise("position add", "other", f"[{t:g} x {d}]", t * d,
                               [Operand(t * d), Operand(t * d, kind)], [Operand(t * d)]))
    if c.embedding_norm:
        ops.append(_norm(c, "embed_norm", t, 1))
    ops.append(_norm(c, "attn_norm", t, nl))
    ops.append(matmul(t, d, c.q_size, "attn.q_proj", "attn_proj", count=nl, bias=c.qkv_bias))
    ops.append(matmul(t, d, c.kv_size, "attn.k_proj", "attn_proj", count=nl, bias=c.qkv_bias))
    ops.append(matmul(t, d, c.kv_size, "attn.v_proj", "attn_proj", count=nl, bias=c.qkv_bias))
    if c.position == "rope":
        heads = c.num_heads + c.num_kv_heads
        ops.append(elementwise("attn.rope", "other", f"[{t:g} x {heads} x {hd}]", 3 * t * heads * c.rotary_dim,
                               [Operand(t * heads * hd), Operand(2 * t * c.rotary_dim)], [Operand(t * heads * hd)],
                               nl))
    # Layers with the same window have identical attention costs; count them together.
    windows = Counter(c.layer_window(i) for i in range(nl))
    for window, layers in sorted(windows.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        keys = l if window is None else min(l, window + q_rows - 1)
        label = "" if window is None else f" (window {window})"
        inst = seqs * c.num_kv_heads * layers
        rows = g * q_rows
        ops.append(matmul(rows, hd, keys, "attn.scores q k^T" + label, "attn_act", b_kind="kv", count=inst))
        score_flops = (5 + (1 if c.position == "alibi" else 0)) * rows * keys
        ops.append(elementwise("attn.softmax" + label, "other", f"[{rows:g} x {keys:g}]", score_flops,
                               [Operand(rows * keys)], [Operand(rows * keys)], inst))
        ops.append(matmul(rows, keys, hd, "attn.probs @ v" + label, "attn_act", b_kind="kv", count=inst))
    ops.append(matmul(t, c.q_size, d, "attn.o_proj", "attn_proj", count=nl, bias=c.attn_out_bias))
    ops.append(_norm(c, "mlp_norm", t, nl))
    act = ACTIVATION_FLOPS[c.activation]
    if c.gated_mlp:
        ops.append(matmul(t, d, f, "mlp.gate_proj", "ffn", count=nl, bias=c.mlp_bias))
        ops.append(matmul(t, d, f, "mlp.up_proj", "ffn", count=nl, bias=c.mlp_bias))
        ops.append(elementwise(f"mlp.{c.activation}(gate) * up", "other", f"[{t:g} x {f}]", (act + 1) * t * f,
                               [Operand(t * f), Operand(t * f)], [Operand(t * f)], nl))
    else:
        ops.append(matmul(t, d, f, "mlp.up_proj", "ffn", count=nl, bias=c.mlp_bias))
        ops.append(elementwise(f"mlp.{c.activation}", "other", f"[{t:g} x {f}]", act * t * f,
                               [Operand(t * f)], [Operand(t * f)], nl))
    ops.append(matmul(t, f, d, "mlp.down_proj", "ffn", count=nl, bias=c.mlp_bias))
    ops.append(elementwise("residual add", "other", f"[{t:g} x {d}]", t * d, [Operand(t * d), Operand(t * d)],
                           [Operand(t * d)], 2 * nl))
    if c.final_norm:
        ops.append(_norm(c, "final_norm", t, 1))
    if logit_rows:
        if e != d:
            ops.append(matmul(logit_rows, d, e, "project_out", "other"))
        ops.append(matmul(logit_rows, e, c.vocab_size, "lm_head", "lm_head"))
    return ops


def group_totals(ops: list[OpCost]) -> dict[str, dict[str, float]]:
    """FLOPs, matmul FLOPs, MOPs and stored elements summed per group (in ``GROUPS`` order)."""
    out: dict[str, dict[str, float]] = {}
    for grp in GROUPS:
        sel = [o for o in ops if o.group == grp]
        if sel:
            out[grp] = {"flops": sum(o.total_flops for o in sel), "matmul_flops": sum(o.total_matmul_flops for o in sel),
                        "mops": sum(o.total_mops for o in sel),
                        "stored_elements": sum(o.total_stored_elements for o in sel)}
    return out


def phase_cost(config: ModelConfig, phase: Phase, n: int, l: int | None, precision: Precision) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward step."""
    ops = forward_ops(config, phase, n, l)
    return sum(o.total_flops for o in ops), sum(o.bytes(precision) * o.count for o in ops)


# Seed 002's arithmetic-intensity tables -----------------------------------------------------------

SEED_D, SEED_HEADS, SEED_FFN = 4096, 32, 11008  # llama-2-7b's d, h and n_ff
SEED_L = (128, 512, 4096, 32000)
SEED_N = (1, 2, 4, 8, 128, 512, 4096)


def intensity_tables(d: int = SEED_D, heads: int = SEED_HEADS, n_ff: int = SEED_FFN,
                     ls: tuple[int, ...] = SEED_L, ns: tuple[int, ...] = SEED_N
                     ) -> dict[str, dict[int, dict[int, float | None]]]:
    """Seed 002's three tables: table[operator][l][n] = FLOPs / MOPs (None where n > l, as the seed's '-')."""
    ops = {"MHA (casting)": lambda n, l: matmul(n, d, d),
           "MHA (act-to-act)": lambda n, l: matmul(n, d // heads, l),
           "FFN": lambda n, l: matmul(n, d, n_ff)}
    return {name: {l: {n: (op(n, l).intensity if n <= l else None) for n in ns} for l in ls}
            for name, op in ops.items()}


# A roofline report ---------------------------------------------------------------------------------

@dataclass
class OpRow:
    """An operator placed on a hardware roofline."""

    op: OpCost
    bytes: float  # per instance
    intensity_bytes: float  # FLOP per byte
    bound: str  # "memory" or "compute"
    time_s: float  # all instances, each at its roof

    def to_dict(self) -> dict[str, Any]:
        o = self.op
        return {"name": o.name, "group": o.group, "shape": o.shape, "count": o.count, "flops": o.flops,
                "matmul_flops": o.matmul_flops, "mops": o.mops, "bytes": self.bytes,
                "intensity_flop_per_element": o.intensity, "intensity_flop_per_byte": self.intensity_bytes,
                "bound": self.bound, "time_s": self.time_s}


@dataclass
class RooflineReport:
    """Every operator of one step of ``phase`` on ``hardware``, with totals per step and per token."""

    model: str
    phase: str
    n: int
    l: int
    tokens: int
    hardware: Hardware
    precision: Precision
    rows: list[OpRow] = field(default_factory=list)

    @property
    def ops(self) -> list[OpCost]:
        return [r.op for r in self.rows]

    @property
    def flops(self) -> float:
        return sum(r.op.total_flops for r in self.rows)

    @property
    def mops(self) -> float:
        return sum(r.op.total_mops for r in self.rows)

    @property
    def bytes(self) -> float:
        return sum(r.bytes * r.op.count for r in self.rows)

    @property
    def time_s(self) -> float:
        """Lower bound of the step's time: each operator at its roof, none overlapping."""
        return sum(r.time_s for r in self.rows)

    @property
    def intensity_bytes(self) -> float:
        return self.flops / self.bytes

    def to_dict(self) -> dict[str, Any]:
        groups = group_totals(self.ops)
        for grp, tot in groups.items():
            tot["bytes"] = sum(r.bytes * r.op.count for r in self.rows if r.op.group == grp)
            tot["time_s"] = sum(r.time_s for r in self.rows if r.op.group == grp)
        dt = self.precision.compute
        return {
            "model": self.model, "phase": self.phase, "n": self.n, "l": self.l, "tokens": self.tokens,
            "precision": self.precision.names, "hardware": self.hardware.to_dict(),
            "ridge_flop_per_byte": self.hardware.ridge(dt), "peak_flops": self.hardware.flops(dt),
            "operators": [r.to_dict() for r in self.rows], "groups": groups,
            "total": {"flops": self.flops, "mops": self.mops, "bytes": self.bytes,
                      "intensity_flop_per_element": self.flops / self.mops,
                      "intensity_flop_per_byte": self.intensity_bytes, "time_s": self.time_s},
            "per_token": {"flops": self.flops / self.tokens, "mops": self.mops / self.tokens,
                          "bytes": self.bytes / self.tokens, "time_s": self.time_s / self.tokens,
                          "tokens_per_s_bound": self.tokens / self.time_s},
        }


def analyze(config: ModelConfig, phase: Phase, n: int, l: int | None, hardware: Hardware,
            precision: Precision) -> RooflineReport:
    """Place every operator of a ``phase`` step on ``hardware``'s roofline (seed 002, section on roofline)."""
    ops = forward_ops(config, phase, n, l)
    peak, bw = hardware.flops(precision.compute), hardware.bandwidth
    ridge = peak / bw
    rows = []
    for op in ops:
        nbytes = op.bytes(precision)
        ai = op.flops / nbytes if nbytes else float("inf")
        rows.append(OpRow(op, nbytes, ai, "compute" if ai >= ridge else "memory",
                          op.count * max(op.flops / peak, nbytes / bw)))
    lval = (n if l is None else l) if phase == "prefill" else (1 if l is None else l)
    return RooflineReport(config.name or config.architecture, phase, n, lval, n, hardware, precision, rows)
