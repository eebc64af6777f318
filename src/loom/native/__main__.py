"""``python -m loom.native``: build (or find cached) loom's native kernels now, as ``make install`` does,
so that a user's first ``loom generate`` does not pay the compilation. Exits 0 either way: loom runs
without them (on the PyTorch twins), and the reason they are unavailable is printed."""

from __future__ import annotations

import os
import sys

from loom import native


def main() -> int:
    if native.available():
        how = f"compiled in {native.build_seconds():.1f} s" if native.build_seconds() else "already built"
        print(f"loom native kernels: {how}", file=sys.stderr)
    elif os.environ.get("LOOM_NATIVE", "1") == "0":
        print("loom native kernels: not built (LOOM_NATIVE=0)", file=sys.stderr)
    else:
        print("loom native kernels: unavailable (the warning above says why); loom uses the PyTorch paths",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
