"""What serving LoRA adapters unmerged costs: `loom bench throughput --loras K`.

S-LoRA (Sheng et al. 2023) and Punica (Chen et al. 2023) serve many adapters of one base model in one
batch: the base GEMM once, plus each row's low-rank product (layers/multi_lora.py). The price is the
extra products (2 r (in + out) FLOPs per token per adapted linear, against 2 in out for the base) and
reading each adapter's A and B. This module writes K random adapters in PEFT's format (every decoder
projection, rank r: the costliest case), then times, in one process and alternating:

- throughput: the same workload with every request on the base model, then request i under adapter
  i mod K (K distinct adapters in every batch);
- batch-1 decode: one request on the base model, then one under an adapter.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Sequence

import torch

from loom.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder projection in HF's naming."""
    c = config
    return {"q_proj": (c.q_size, c.hidden_size), "k_proj": (c.kv_size, c.hidden_size),
            "v_proj": (c.kv_size, c.hidden_size), "o_proj": (c.hidden_size, c.q_size),
            "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
            "down_proj": (c.hidden_size, c.intermediate_size)}


def write_random_adapter(config: ModelConfig, folder: str, rank: int, seed: int, std: float = 0.02,
                         targets: Sequence[str] = PROJECTIONS) -> str:
    """A PEFT LoRA adapter folder on the decoder projections ``targets`` (default: every one) with random A and
    B (N(0, std^2)), alpha = 2r."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj, (out, fan_in) in projection_shapes(config).items():
            if proj not in targets:
                continue
            owner = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{owner}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * std
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
                   "bias": "none", "task_type": "CAUSAL_LM"}, f)
    return folder


def write_random_adapters(config: ModelConfig, root: str, count: int, rank: int,
                          targets: Sequence[str] = PROJECTIONS) -> tuple[tuple[str, str], ...]:
    """``count`` adapters (name, folder) under ``root``: lora-0, lora-1, ..."""
    return tuple((f"lora-{i}", write_random_adapter(config, os.path.join(root, f"lora-{i}"), rank, seed=i,
                                                    targets=targets)) for i in range(count))


def adapter_flops_per_token(config: ModelConfig, rank: int, targets: Sequence[str] = PROJECTIONS) -> float:
    """Extra FLOPs per token of an adapter on ``targets``: 2 r (in + out) per projection per layer."""
    return config.num_layers * sum(2 * rank * (out + fan_in) for proj, (out, fan_in) in
                                   projection_shapes(config).items() if proj in targets)


def batch1_decode(llm: Any, adapter: str, prompt_ids: list[int], gen_len: int, repeats: int) -> dict[str, Any]:
    """Batch-1 decode tokens/s on the base model and under ``adapter``, alternating; best of each."""
    from loom.outputs import Timings
    from loom.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=gen_len, min_tokens=gen_len, temperature=0.0)
    runs: dict[str, list[float]] = {"base": [], "adapter": []}
    steps: dict[str, str | None] = {}
    for _ in range(repeats):
        for key, name in (("base", None), ("adapter", adapter)):
            llm.engine.block_manager.reset_prefix_cache()
            t = Timings()
            for _ in llm.stream(prompt_ids, params, t, lora=name):
                pass
            runs[key].append(t.decode_tokens_per_s)
            steps[key] = llm.engine.runner.last_decode_step
    base, with_adapter = max(runs["base"]), max(runs["adapter"])
    return {"prompt_len": len(prompt_ids), "gen_len": gen_len, "base_decode_tokens_per_s": base,
            "adapter_decode_tokens_per_s": with_adapter, "adapter_over_base": with_adapter / base,
            "adapter_over_base_median": statistics.median(runs["adapter"]) / statistics.median(runs["base"]),
            "runs": runs, "decode_step": steps}


def summarize(base_runs: Sequence[dict[str, Any]], mixed_runs: Sequence[dict[str, Any]], count: int, rank: int,
              config: ModelConfig, flops_per_token: float, targets: Sequence[str] = PROJECTIONS) -> dict[str, Any]:
    """The base and mixed-adapter throughput (best runs, every run's figure), and their ratio."""
    best = {k: max(runs, key=lambda r: r["total_tokens_per_s"]) for k, runs in
            (("base", base_runs), ("mixed", mixed_runs))}
    return {"adapters": count, "rank": rank, "targets": list(targets),
            "adapter_flops_per_token": adapter_flops_per_token(config, rank, targets),
            "adapter_flops_fraction": adapter_flops_per_token(config, rank, targets) / flops_per_token,
            "base": {**best["base"], "total_tokens_per_s_runs": [r["total_tokens_per_s"] for r in base_runs]},
            "mixed": {**best["mixed"], "total_tokens_per_s_runs": [r["total_tokens_per_s"] for r in mixed_runs]},
            "mixed_over_base": best["mixed"]["total_tokens_per_s"] / best["base"]["total_tokens_per_s"],
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


class PeftMixedStatic:
    """The peer: HF transformers + PEFT, every adapter loaded into one PeftModel, static batches of
    ``batch`` prompts (left-padded, greedy) where each row runs under its own adapter (PEFT's mixed-adapter
    batches, ``generate(..., adapter_names=...)``: rows are grouped by adapter inside each LoRA layer)."""

    def __init__(self, folder: str, dtype: torch.dtype, pad_id: int, adapters: Sequence[tuple[str, str]],
                 names: Sequence[str], device: str | torch.device = "cpu") -> None:
        from peft import PeftModel

        from loom.bench.throughput import HFStatic

        self.base = HFStatic(folder, dtype, pad_id, device)
        model = PeftModel.from_pretrained(self.base.model, adapters[0][1], adapter_name=adapters[0][0])
        for name, path in adapters[1:]:
            model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self.names = list(names)
        self.device = self.base.device

    def run(self, prompts: list[list[int]], output_len: int | Sequence[int], batch: int) -> dict[str, Any]:
        """HFStatic.run's figures, prompt i under adapter ``names[i]``."""
        offset = 0
        pad = self.base.pad_id

        def generate(chunk: list[list[int]], new_tokens: int) -> int:
            nonlocal offset
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=pad,
                                adapter_names=self.names[offset:offset + len(chunk)])
            offset += len(chunk)
            return width

        self.base._generate = generate  # type: ignore[method-assign]
        return self.base.run(prompts, output_len, batch)


def plot_lora(result: dict[str, Any], path: str) -> None:
    """Two panels from a `bench throughput --loras K` result: total tokens/s of the base model, loom's mixed
    batch of K adapters and HF + PEFT's best mixed batch (every PEFT configuration as a faint bar); batch-1
    decode tokens/s with and without an adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = result["results"]["loom_lora"]
    k, r = lora["adapters"], lora["rank"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    labels = ["loom, base model", f"loom, {k} adapters"]
    values = [lora["base"]["total_tokens_per_s"], lora["mixed"]["total_tokens_per_s"]]
    colors = ["#4c72b0", "#55a868"]
    for c in lora.get("peft_configs", []):
        if "error" not in c:
            labels.append(f"HF+PEFT {c['dtype'].replace('float', 'fp').replace('bfloat16', 'bf16')} x{c['batch']}")
            values.append(c["total_tokens_per_s"])
            colors.append("#c44e52" if c == lora.get("peft") else "#e8a5a7")
    bars = left.bar(range(len(values)), values, color=colors)
    left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=7)
    left.set_ylabel("total tokens/s")
    left.set_title(f"{result['num_prompts']} requests, {k} rank-{r} adapters in one batch "
                   f"(mixed / base = {lora['mixed_over_base']:.2f})", fontsize=9)
    left.grid(axis="y", alpha=0.3)
    b1 = lora["batch1"]
    bars = right.bar([0, 1], [b1["base_decode_tokens_per_s"], b1["adapter_decode_tokens_per_s"]],
                     color=["#4c72b0", "#55a868"])
    right.bar_label(bars, fmt="%.0f", fontsize=7)
    right.set_xticks([0, 1], ["base", "1 adapter"], fontsize=8)
    right.set_ylabel("decode tokens/s")
    right.set_title(f"batch 1 ({b1['adapter_over_base']:.2f})", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
