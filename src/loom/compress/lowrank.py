"""Low-rank factorization of the decoder's linears: W ~ up @ down by truncated SVD, plain or activation-aware.

Plain SVD. With W = U diag(sigma) V^T [out, in], the truncation W_r = U_r diag(sigma_r) V_r^T is the best
rank-r approximation of W in the Frobenius (and spectral) norm (Eckart & Young 1936):

    min_{rank W' <= r} ||W - W'||_F^2 = ||W - W_r||_F^2 = sum_{i > r} sigma_i^2

stored as two factors that split the singular values evenly:

    up = U_r diag(sigma_r)^{1/2}  [out, r],     down = diag(sigma_r)^{1/2} V_r^T  [r, in]

Activation-aware (ASVD, Yuan et al. 2023, arXiv 2312.05821). What a layer's error costs is the error of its
output on the inputs it really sees, E||(W - W') x||^2 = ||(W - W') C^{1/2}||_F^2 with C = E[x x^T], and
LLM activations are dominated by a few input channels. ASVD stands in a diagonal scale for C^{1/2}, one entry
per input channel, measured on calibration text (the layer's inputs, collected with forward hooks):

    s_j = (mean_t |x_tj|)^alpha            (alpha = 0.5 by default, the paper's choice)

and truncates the scaled matrix instead: W S = U' diag(sigma') V'^T with S = diag(s), then

    W' = [W S]_r S^{-1}:   up = U'_r diag(sigma'_r)^{1/2},   down = diag(sigma'_r)^{1/2} V'_r^T S^{-1}

By Eckart-Young applied to W S, W' minimizes ||(W - W') S||_F over rank-r matrices: the columns that meet
large activations are kept more exactly, at the price of a larger plain error ||W - W'||_F. (With
alpha = 1 and S from RMS values this is the output error under a diagonal C; mean |x| with alpha = 0.5 is
the paper's softened form.)

Rank by a parameter budget: a projection [out, in] factorized to rank r holds r (out + in) parameters; with
``keep`` the fraction of its out * in parameters to keep, r is the largest with r (out + in) <= keep out in
(``rank_for_budget``), so every projection keeps the same fraction (a uniform budget; ASVD's sensitivity-based
rank allocation, STRS, is not implemented). Note what this means: a square matrix keeps half its parameters
at rank out / 4, so keep = 0.9 already drops 55% of a square projection's singular directions.

loom fuses q|k|v and gate|up; each HF projection (q_proj, k_proj, ...) is factorized on its own, with its own
rank, and the fused slot becomes a ``FusedLinear`` of the parts (layers/lowrank.py): the parameter count is
exactly the sum of the projections' factors, and a checkpoint stores each under its HF name. Projections share
their input statistics (q, k and v see the same x). Data-driven runs walk the layers in order with
``LayerwiseCalibration``: layer i's inputs are computed by layers 0..i-1 already factorized.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from loom.compress.calibration import LayerwiseCalibration
from loom.layers.linear import Linear
from loom.layers.lowrank import FusedLinear, LowRankLinear, dense_part, lowrank_parts
from loom.models.transformer import Transformer

METHODS = ("svd", "asvd")
# loom's linear in a decoder layer -> (the HF module holding it, the HF projections in row order)
PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attn.qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "attn.o_proj": ("self_attn", ("o_proj",)),
    "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "mlp.up_proj": ("mlp", ("up_proj",)),  # an ungated MLP
    "mlp.down_proj": ("mlp", ("down_proj",)),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LowRankError(ValueError):
    """A factorization that cannot be done as asked (a budget, a method, a model already compressed)."""


def rank_for_budget(out_features: int, in_features: int, keep: float) -> int:
    """The largest r with r (out + in) <= keep out in: the rank at which the two factors hold at most the
    fraction ``keep`` of the dense matrix's parameters (0 when even rank 1 costs more)."""
    if out_features < 1 or in_features < 1:
        raise LowRankError(f"a projection needs positive sizes, got [{out_features}, {in_features}]")
    if keep <= 0:
        raise LowRankError(f"keep must be positive, got {keep}")
    budget, per_rank = keep * out_features * in_features, out_features + in_features
    r = math.floor(budget / per_rank)
    while r > 0 and r * per_rank > budget:  # guard float rounding at an exact boundary
        r -= 1
    while (r + 1) * per_rank <= budget:
        r += 1
    return r


@dataclass
class LowRankConfig:
    """``keep``: fraction of each chosen projection's parameters kept, in (0, 1]; ``method``: "svd" or "asvd";
    ``alpha``: ASVD's exponent; ``targets``: HF projection names to factorize (default every decoder linear;
    embeddings and the output layer never); ``rank``: one fixed rank for every target instead of the budget
    (clipped to min(out, in)); ``output_error``: with calibration samples, also measure each projection's
    relative output error on them (costs one x^T x per linear)."""

    keep: float = 0.75
    method: str = "svd"
    alpha: float = 0.5
    targets: tuple[str, ...] = PROJECTIONS
    rank: int | None = None
    output_error: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowRankError(f"unknown low-rank method {self.method!r}; choose one of {METHODS}")
        if not 0 < self.keep <= 1:
            raise LowRankError(f"keep must be in (0, 1], got {self.keep}")
        if self.alpha < 0:
            raise LowRankError(f"alpha must be >= 0, got {self.alpha}")
        if self.rank is not None and self.rank < 1:
            raise LowRankError(f"rank must be positive, got {self.rank}")
        self.targets = tuple(self.targets)
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown or not self.targets:
            raise LowRankError(f"targets {sorted(unknown) or '(none)'} are not decoder projections "
                               f"({', '.join(PROJECTIONS)})")

    def rank_for(self, out_features: int, in_features: int) -> int:
        r = self.rank if self.rank is not None else rank_for_budget(out_features, in_features, self.keep)
        if r < 1:
            raise LowRankError(f"keep {self.keep} leaves no rank for a [{out_features}, {in_features}] projection "
                               f"(rank 1 holds {out_features + in_features} parameters)")
        return min(r, out_features, in_features)

    def metadata(self) -> dict[str, Any]:
        """What a factorized checkpoint's config.json records under "lowrank"."""
        meta = asdict(self)
        meta.pop("output_error")
        meta["targets"] = list(self.targets)
        if self.method != "asvd":
            meta.pop("alpha")
        return meta


@dataclass
class FactorRecord:
    """One factorized projection: ``weight_error`` = ||W - up down||_F / ||W||_F; ``output_error`` the same for
    the outputs on the calibration inputs, sqrt(tr(D C D^T) / tr(W C W^T)) with D = W - up down and C = X^T X
    (None without calibration)."""

    name: str  # e.g. "layers.3.self_attn.q_proj"
    out_features: int
    in_features: int
    rank: int
    params_before: int
    params_after: int
    weight_error: float
    output_error: float | None = None


@dataclass
class LowRankReport:
    """Per-projection ranks and errors, and the parameters of all decoder linears' weights before and after
    (projections left dense count on both sides; biases are not counted)."""

    config: LowRankConfig
    layers: list[FactorRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def fraction_kept(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def rank_range(self) -> tuple[int, int]:
        ranks = [r.rank for r in self.layers]
        return (min(ranks), max(ranks)) if ranks else (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.metadata(), "decoder_linear_params_before": self.params_before,
                "decoder_linear_params_after": self.params_after, "fraction_kept": self.fraction_kept,
                "rank_range": list(self.rank_range), "layers": [asdict(r) for r in self.layers]}


class InputStatistics:
    """Running statistics of one linear's inputs over calibration tokens: sum |x_j| per channel (fp64) for
    ASVD's scale, and optionally x^T x (fp32) for the output error."""

    def __init__(self, in_features: int, covariance: bool) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.gram = torch.zeros(in_features, in_features) if covariance else None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)
        self.n += x.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


def asvd_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = (mean |x_j|)^alpha, floored at 1e-6 of the largest so that dead channels stay invertible."""
    m = mean_abs.double()
    top = float(m.max()) if m.numel() else 0.0
    if top <= 0:
        return torch.ones_like(m)
    return m.clamp_min(1e-6 * top).pow(alpha)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK's SVD on one thread: on the project's 2-core machine, shared with other work, a [1536, 576]
    SVD took 10.4 s on 2 threads (OpenMP workers waiting on each other) and 0.13 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def svd_factors(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, in], up [out, r]) of the rank-``rank`` truncated SVD of ``weight`` (fp64 inside, returned
    in the weight's dtype); with ``scale`` s, of W diag(s), and down multiplied by diag(1/s) (ASVD)."""
    a = weight.detach().double()
    if scale is not None:
        a = a * scale.double()[None, :]
    with _one_thread():
        u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    root = sigma[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = root[:, None] * vh[:rank]
    if scale is not None:
        down = down / scale.double()[None, :]
    return down.to(weight.dtype).contiguous(), up.to(weight.dtype).contiguous()


def relative_errors(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                    gram: torch.Tensor | None) -> tuple[float, float | None]:
    """(||D||_F / ||W||_F, and with C = X^T X, sqrt(tr(D C D^T) / tr(W C W^T))), D = W - up down."""
    w = weight.detach().double()
    d = w - up.double() @ down.double()
    weight_error = float(d.norm() / w.norm().clamp_min(1e-300))
    if gram is None:
        return weight_error, None
    c = gram.double()
    num, den = float(((d @ c) * d).sum()), float(((w @ c) * w).sum())
    return weight_error, math.sqrt(max(num, 0.0) / den) if den > 0 else None


@torch.no_grad()
def factorize(model: Transformer, config: LowRankConfig, calibration_samples: torch.Tensor | None = None
              ) -> LowRankReport:
    """Replace each target projection of ``model``'s decoder layers by its low-rank factors, in place.

    ``calibration_samples``: token ids [samples, seq_len]; required by ASVD (its scales), optional for plain
    SVD (then only used to report the output errors). Returns the ``LowRankReport``."""
    slots = _check_model(model, config)
    if config.method == "asvd" and calibration_samples is None:
        raise LowRankError("asvd needs calibration samples (its scales come from the layers' inputs)")
    report = LowRankReport(config)
    if calibration_samples is None:
        for i in range(model.config.num_layers):
            for name in slots[i]:
                _factorize_slot(model, i, name, None, config, report)
        return report
    calib = LayerwiseCalibration(model, calibration_samples)
    for i in calib.layers(desc=f"{config.method} layers"):
        chosen = [name for name in slots[i] if _targets_in(model, name, config)]
        stats = {name: InputStatistics(model.layers[i].get_submodule(name).in_features, config.output_error)
                 for name in chosen}
        calib.run({model.layers[i].get_submodule(name): stats[name].add for name in chosen})
        for name in slots[i]:
            _factorize_slot(model, i, name, stats.get(name), config, report)
    return report


def _check_model(model: Transformer, config: LowRankConfig) -> list[list[str]]:
    """Each layer's linear slots (names relative to the layer); every problem raised before any work is done."""
    slots: list[list[str]] = []
    for i, block in enumerate(model.layers):
        modules = dict(block.named_modules())
        names = [name for name in PARTS if name in modules]
        for name in names:
            if _targets_in(model, name, config) and type(modules[name]) is not Linear:
                raise LowRankError(f"layer {i} {name} is a {type(modules[name]).__name__}, not a dense Linear "
                                   "(already compressed? factorize a dense fp32 model)")
            if _targets_in(model, name, config):
                sizes = _row_sizes(model, i, name, modules[name].out_features)
                for part, rows in zip(_part_names(name, len(sizes)), sizes):
                    if part in config.targets:
                        config.rank_for(rows, modules[name].in_features)
        slots.append(names)
    return slots


def _targets_in(model: Transformer, name: str, config: LowRankConfig) -> bool:
    return any(p in config.targets for p in PARTS[name][1])


def _part_names(name: str, count: int) -> tuple[str, ...]:
    """The HF projections of loom's linear ``name`` split into ``count`` row blocks."""
    names = PARTS[name][1]
    if len(names) == count:
        return names
    return names[:1] if count == 1 else tuple(f"part{k}" for k in range(count))


def _row_sizes(model: Transformer, i: int, name: str, rows: int) -> list[int]:
    return model.fused_row_splits().get(f"layers.{i}.{name}.weight", [rows])


def _factorize_slot(model: Transformer, i: int, name: str, stats: InputStatistics | None, config: LowRankConfig,
                    report: LowRankReport) -> None:
    """Factorize the target parts of layer i's linear ``name`` and install the result; count parameters."""
    layer = model.layers[i].get_submodule(name)
    w = layer.weight.detach()
    report.params_before += w.numel()
    if not _targets_in(model, name, config):
        report.params_after += w.numel()
        return
    hf_module = PARTS[name][0]
    sizes = _row_sizes(model, i, name, w.shape[0])
    part_names = _part_names(name, len(sizes))
    scale = None
    if config.method == "asvd":
        scale = asvd_scale(stats.mean_abs(), config.alpha)  # type: ignore[union-attr]
    gram = stats.gram if stats is not None else None
    bias = None if layer.bias is None else layer.bias.detach()
    parts: list[nn.Module] = []
    start = 0
    for part, rows in zip(part_names, sizes):
        wp = w[start:start + rows]
        bp = None if bias is None else bias[start:start + rows]
        start += rows
        if part not in config.targets:
            parts.append(dense_part(wp.clone(), None if bp is None else bp.clone()))
            report.params_after += wp.numel()
            continue
        rank = config.rank_for(*wp.shape)
        down, up = svd_factors(wp, rank, scale)
        weight_error, output_error = relative_errors(wp, down, up, gram)
        parts.append(LowRankLinear(down, up, None if bp is None else bp.clone()))
        report.params_after += rank * sum(wp.shape)
        report.layers.append(FactorRecord(f"layers.{i}.{hf_module}.{part}", wp.shape[0], wp.shape[1], rank,
                                          wp.numel(), rank * sum(wp.shape), weight_error, output_error))
    module = parts[0] if len(parts) == 1 else FusedLinear(parts, part_names)
    model.replace_module(f"layers.{i}.{name}", module)


def decoder_linear_fraction(model: Transformer) -> float:
    """Parameters of the decoder linears' weights now (factors counted as r (out + in)) over their dense count."""
    now = dense = 0
    for block in model.layers:
        modules = dict(block.named_modules())
        for name in (n for n in PARTS if n in modules):
            m = modules[name]
            dense += m.in_features * m.out_features
            low = lowrank_parts(m)
            now += sum(p.num_weight_parameters() for p in low)
            now += sum(p.in_features * p.out_features for p in getattr(m, "parts", [m]) if p not in low)
    return now / dense if dense else 1.0
