"""`loom bench load`: seconds from a model file to a ready model, loom against HF transformers."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from loom.default_model import default_model_path


def run_load(model: str | None = None, peers: Sequence[str] = ("hf",), repeats: int = 3) -> dict[str, Any]:
    from loom.llm import LLM

    path = model or default_model_path()
    results: dict[str, Any] = {}
    loom_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        LLM(path)  # weights + tokenizer
        loom_times.append(time.perf_counter() - t)
    results["loom"] = {"load_s": min(loom_times), "runs": loom_times}
    if "hf" in peers:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t = time.perf_counter()
        if os.path.isdir(path):
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            AutoTokenizer.from_pretrained(path)
        else:
            folder, name = os.path.split(os.path.abspath(path))
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            AutoTokenizer.from_pretrained(folder, gguf_file=name)
        results["hf"] = {"load_s": time.perf_counter() - t}
        results["speedup_vs_hf"] = results["hf"]["load_s"] / results["loom"]["load_s"]
    return {"benchmark": "load", "model": path, "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
