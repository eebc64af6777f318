"""The roofline chart: the roof of a machine, the operators of prefill and decode on it, and measured runs.

x: arithmetic intensity in FLOP/byte; y: FLOP/s; roof = min(peak, intensity x bandwidth). Each
operator is drawn on the roof at its intensity (the best it could do); the whole step (all operators
together) as a star; measured runs (achieved FLOP/s at the step's intensity) as crosses below the roof.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from loom.analysis.measured import MeasuredPoint
from loom.analysis.presets import Hardware
from loom.analysis.roofline import GROUPS, RooflineReport

if TYPE_CHECKING:
    from loom.analysis.collectives import AllReduceMeasurement
    from loom.analysis.parallel import TPDecode
    from loom.analysis.presets import Link

GROUP_COLORS = {"attn_proj": "tab:blue", "attn_act": "tab:orange", "ffn": "tab:green", "norm": "tab:purple",
                "lm_head": "tab:red", "other": "tab:gray"}
PHASE_MARKERS = {"prefill": "o", "decode": "s"}


def _fmt_flops(x: float) -> str:
    for scale, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.3g} {p}FLOP/s"
    return f"{x:.3g} FLOP/s"


def plot_roofline(hardware: Hardware, reports: Sequence[RooflineReport], path: str,
                  measured: Sequence[MeasuredPoint] = (), dtype: str = "fp32", title: str | None = None) -> str:
    """Write the chart to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak, bw = hardware.flops(dtype), hardware.bandwidth
    ridge = peak / bw
    xs = [r.intensity_bytes for rep in reports for r in rep.rows if 0 < r.intensity_bytes < math.inf]
    xs += [m.intensity for m in measured] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    fig, ax = plt.subplots(figsize=(10, 6.5))
    grid = [lo * (hi / lo) ** (i / 400) for i in range(401)]
    ax.plot(grid, [min(peak, x * bw) for x in grid], color="black", lw=2,
            label=f"roof: {bw / 1e9:.3g} GB/s, {_fmt_flops(peak)} ({dtype})")
    ax.axvline(ridge, color="black", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.3g} FLOP/B", (ridge, peak), textcoords="offset points", xytext=(4, -14), fontsize=8)
    seen: set[str] = set()
    for rep in reports:
        marker = PHASE_MARKERS.get(rep.phase, "o")
        for row in rep.rows:
            ai = row.intensity_bytes
            if not 0 < ai < math.inf:
                continue  # the embedding lookup does no arithmetic
            grp = row.op.group
            label = GROUPS[grp] if grp not in seen else None
            seen.add(grp)
            y = hardware.attainable(ai, dtype)
            if rep.phase == "prefill":  # hollow and large, so decode's operators at the same place show through
                ax.scatter([ai], [y], marker=marker, s=110, facecolors="none", edgecolors=GROUP_COLORS[grp],
                           linewidths=1.6, zorder=3)
            else:
                ax.scatter([ai], [y], marker=marker, s=30, color=GROUP_COLORS[grp], edgecolors="black",
                           linewidths=0.4, zorder=3)
            if label:
                ax.scatter([], [], marker="o", color=GROUP_COLORS[grp], label=label)
        ai = rep.intensity_bytes
        ax.scatter([ai], [hardware.attainable(ai, dtype)], marker="*", s=420, color="gold", edgecolors="black",
                   alpha=0.55, zorder=2, label=f"{rep.phase} n={rep.n} l={rep.l}: whole step ({ai:.3g} FLOP/B)")
    for m in measured:
        roof = hardware.attainable(m.intensity, dtype)
        ax.scatter([m.intensity], [m.achieved_flops], marker="X", s=120, color="crimson", edgecolors="black",
                   zorder=5, label=f"{m.label}: {_fmt_flops(m.achieved_flops)}, {m.achieved_bandwidth / 1e9:.3g} GB/s "
                                   f"({100 * m.achieved_flops / roof:.0f}% of roof)")
        ax.plot([m.intensity, m.intensity], [m.achieved_flops, roof], color="crimson", ls="--", lw=1)
    for phase, marker in PHASE_MARKERS.items():
        if any(r.phase == phase for r in reports):
            hollow = phase == "prefill"
            ax.scatter([], [], marker=marker, facecolors="none" if hollow else "black", edgecolors="black",
                       label=f"operators of {phase}" + (" (hollow)" if hollow else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ys = [m.achieved_flops for m in measured] + [hardware.attainable(x, dtype) for x in xs]
    ax.set_ylim(min(ys) / 4, peak * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title or f"Roofline: {hardware.name}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_parallel(rows: Sequence["TPDecode"], links: Sequence["Link"], path: str,
                  measured: "AllReduceMeasurement | None" = None, messages: Sequence[tuple[str, float]] = (),
                  title: str | None = None) -> str:
    """Two panels. Left: per-token decode time against the tensor-parallel degree for each link (the
    roofline's time / N plus the all-reduces), with the no-communication line. Right: one all-reduce's
    time against its message on 2 ranks for each link, this machine's measured loopback points, and the
    decode messages (``messages``: label, bytes) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from loom.analysis.parallel import allreduce_time

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = dict(zip([link.name for link in links], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    by_link: dict[str, list] = {}
    for r in rows:
        by_link.setdefault(r.link, []).append(r)
    ideal = sorted({(r.ranks, r.compute_s / r.tokens) for r in rows})
    ax.plot([n for n, _ in ideal], [t * 1e3 for _, t in ideal], "k--", lw=1, label="no communication (roofline / N)")
    for name, pts in by_link.items():
        ax.plot([p.ranks for p in pts], [p.per_token_s * 1e3 for p in pts], "o-", color=colors.get(name), label=name)
    first = rows[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r.ranks for r in rows}), [str(n) for n in sorted({r.ranks for r in rows})])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("tensor-parallel devices N")
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title(title or f"{first.model}: decode, {first.tokens} sequence(s) at l={first.context}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    sizes = [2.0 ** k for k in range(6, 25)]
    for link in links:
        bx.plot(sizes, [allreduce_time(m, 2, link) * 1e6 for m in sizes], color=colors.get(link.name), label=link.name)
    if measured is not None:
        fit = measured.link or measured.fit()
        bx.plot(sizes, [allreduce_time(m, 2, fit) * 1e6 for m in sizes], color="crimson", ls=":",
                label=f"loopback fit: alpha {fit.latency * 1e6:.3g} us, beta {fit.bandwidth / 1e9:.3g} GB/s")
        bx.scatter(measured.sizes, [t * 1e6 for t in measured.seconds], marker="X", s=80, color="crimson", zorder=5,
                   label="loopback measured (best)")
        bx.scatter([measured.step_bytes], [measured.step_seconds / measured.step_allreduces * 1e6], marker="*",
                   s=200, color="gold", edgecolors="black", zorder=6,
                   label=f"measured: {measured.step_allreduces} back-to-back (a TP=2 decode step), per all-reduce")
    for label, nbytes in messages:
        bx.axvline(nbytes, color="gray", ls="--", lw=0.8)
        bx.annotate(label, (nbytes, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7, va="top",
                    xytext=(3, -4), textcoords="offset points")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("message (bytes)")
    bx.set_ylabel("one all-reduce on 2 ranks (us)")
    bx.set_title("alpha-beta model, ring all-reduce, N = 2")
    bx.grid(True, which="both", alpha=0.25)
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
