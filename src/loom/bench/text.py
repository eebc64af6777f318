"""Fixed benchmark text, so runs are comparable from machine to machine (defined in loom.analysis.runs,
which ``loom analyze plot --measure`` shares with the benchmarks)."""

from __future__ import annotations

from loom.analysis.runs import PASSAGE, benchmark_prompt_ids

__all__ = ["PASSAGE", "benchmark_prompt_ids"]
