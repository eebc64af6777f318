"""Plain-text output for the analysis commands: SI-prefixed numbers and aligned tables."""

from __future__ import annotations

import math
from typing import Sequence

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BINARY = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def si(x: float | None, unit: str = "", digits: int = 3) -> str:
    """1.234e9 -> '1.23 G' + unit (3 significant digits); None -> '-'."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    for scale, prefix in _PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()


def seconds(x: float | None) -> str:
    """Seconds as s / ms / us / ns with 3 significant digits."""
    if x is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def binary(n: float | None) -> str:
    """Bytes with binary prefixes (GiB, MiB, ...)."""
    if n is None:
        return "-"
    for scale, unit in _BINARY:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """An aligned table; numeric-looking columns are right-aligned unless ``right`` says otherwise."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if right is None:
        right = [i > 0 for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        parts = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
