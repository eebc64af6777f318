"""How `loom` commands print: JSON results and the one-line speed summary of a generation."""

from __future__ import annotations

import json
from typing import Any, Callable


def print_json(obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """``obj`` as indented JSON on stdout (``default`` converts what JSON cannot hold)."""
    print(json.dumps(obj, indent=2, default=default))


def stats_line(t: Any, load_s: float | None = None) -> str:
    """'[prompt N tokens in S s (X tok/s) | M tokens, decode Y tok/s | load L s]' from a generation's Timings."""
    parts = [f"prompt {t.prompt_tokens} tokens in {t.prefill:.2f} s ({t.prefill_tokens_per_s:.0f} tok/s)",
             f"{t.generated_tokens} tokens, decode {t.decode_tokens_per_s:.1f} tok/s"]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    return "[" + " | ".join(parts) + "]"
