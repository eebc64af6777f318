"""Resident memory after ``LLM(model)`` in a fresh process (the weights as loom keeps them, default weights).

    python scripts/rss_after_load.py [--model gemma-3-270m] [--src path/to/other/checkout/src]

``--src`` puts another checkout's package first on the path (to compare two commits). Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys


def rss_bytes() -> int:
    """This process's resident set (Linux /proc; an older checkout given by --src may not have loom's helper)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--src", default=None)
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    from loom import LLM

    before = rss_bytes()
    llm = LLM(args.model)
    gc.collect()
    after = rss_bytes()
    print(json.dumps({"model": args.model or "default", "rss_before_mib": before / 2**20,
                      "rss_after_load_mib": after / 2**20, "embedding": type(llm.model.embed_tokens).__name__}))


if __name__ == "__main__":
    main()
