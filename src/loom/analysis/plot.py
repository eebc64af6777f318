"""The roofline chart: the roof of a machine, the operators of prefill and decode on it, and measured runs.

x: arithmetic intensity in FLOP/byte; y: FLOP/s; roof = min(peak, intensity x bandwidth). Each
operator is drawn on the roof at its intensity (the best it could do); the whole step (all operators
together) as a star; measured runs (achieved FLOP/s at the step's intensity) as crosses below the roof.
"""

from __future__ import annotations

import math
from typing import Sequence

from loom.analysis.measured import MeasuredPoint
from loom.analysis.presets import Hardware
from loom.analysis.roofline import GROUPS, RooflineReport

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
