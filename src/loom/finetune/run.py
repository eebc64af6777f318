"""One fine-tuning run, end to end: load the base (dense fp32), attach LoRA (or a soft prompt), read and
split the data, measure held-out loss, train, measure again, save the adapter (PEFT's format), the log and
the loss curve."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loom.finetune.data import as_tensors, batches, train_and_held_out
from loom.finetune.lora import LoraConfig, attach_lora, quantize_base_nf4
from loom.finetune.prompt_tuning import PromptTuningConfig, attach_prompt_tuning
from loom.finetune.train import LossFn, TrainConfig, lm_loss, train
from loom.tokenizer import load_tokenizer
from loom.weights.loader import load_model, release_freed_memory


@dataclass
class FinetuneConfig:
    """A run: the base model, the data, the adapter and the optimizer settings, and where to write."""

    model: str
    data: str
    out: str
    method: str = "lora"  # or "prompt-tuning" (a soft prompt of N virtual tokens; Lester et al. 2021)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 256
    batch_size: int = 4
    eval_fraction: float = 0.1
    eval_data: str | None = None  # a separate held-out file (else eval_fraction of data)
    seed: int = 0
    qlora: bool = False  # the frozen base's decoder linears in NF4 (QLoRA)
    resume: str | None = None  # a checkpoint folder an earlier run wrote (train.save_every)


    def __post_init__(self) -> None:
        if self.method not in ("lora", "prompt-tuning"):
            raise ValueError(f"method must be lora or prompt-tuning, got {self.method!r}")


@torch.no_grad()
def held_out_loss(model: Any, examples: list, batch_size: int, loss_fn: LossFn = lm_loss, first: int = 1) -> float:
    """Token-weighted mean loss over ``examples`` (exp of it is the perplexity); ``first``: the first label
    a sequence predicts (1 for a plain model; 0 behind a soft prompt, whose last virtual token predicts it)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, labels = as_tensors(examples[i:i + batch_size])
        n = sum(int((lab[first:] != -100).sum()) for lab in labels)
        total += float(loss_fn(model, ids, labels)) * n
        count += n
    return total / max(1, count)


def finetune(config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run it; returns the summary written to ``out/finetune.json``."""
    loaded = load_model(config.model, weights="fp32")
    tokenizer = load_tokenizer(config.model, loaded.metadata, loaded.config.eos_token_ids)
    model = loaded.model
    train_set, eval_set = train_and_held_out(config.data, tokenizer, config.seq_len, config.batch_size,
                                             config.eval_data, config.eval_fraction, config.seed)
    torch.manual_seed(config.seed)
    base_bytes = None
    if config.qlora:
        base_bytes = quantize_base_nf4(model)
        release_freed_memory()  # the fp32 weights just replaced: give their pages back
    if config.method == "prompt-tuning":
        adapter: Any = attach_prompt_tuning(model, config.prompt_tuning, tokenizer)
        loss_fn, first = adapter.loss, 0
    else:
        adapter, loss_fn, first = attach_lora(model, config.lora), lm_loss, 1
    before = held_out_loss(model, eval_set, config.batch_size, loss_fn, first) if eval_set else None
    data = (as_tensors(b) for b in batches(train_set, config.batch_size, config.seed))
    reset_peak_rss()
    start = time.perf_counter()
    logs = train(model, adapter.parameters(), data, config.train, progress=progress, loss_fn=loss_fn,
                 checkpoint_dir=os.path.join(config.out, "checkpoint"), resume=config.resume)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()  # training's peak: the model, activations, gradients and optimizer state
    after = held_out_loss(model, eval_set, config.batch_size, loss_fn, first) if eval_set else None
    adapter.save(config.out, base_model=config.model)
    summary = {"model": config.model, "data": config.data, "out": config.out,
               "train_examples": len(train_set), "eval_examples": len(eval_set),
               "method": config.method, "trainable_parameters": sum(p.numel() for p in adapter.parameters()),
               "train_tokens": sum(log.tokens for log in logs), "train_seconds": seconds,
               "train_tokens_per_s": sum(log.tokens for log in logs) / seconds,
               "eval_loss_before": before, "eval_loss_after": after,
               "eval_perplexity_before": math.exp(before) if before is not None else None,
               "eval_perplexity_after": math.exp(after) if after is not None else None,
               "losses": [log.loss for log in logs],
               "lora": asdict(config.lora) if config.method == "lora" else None,
               "prompt_tuning": asdict(config.prompt_tuning) if config.method == "prompt-tuning" else None,
               "train": asdict(config.train),
               "seq_len": config.seq_len, "batch_size": config.batch_size, "qlora": config.qlora,
               "nf4_linear_bytes": base_bytes, "train_peak_rss_bytes": peak}
    with open(os.path.join(config.out, "finetune.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    plot_losses(summary, os.path.join(config.out, "loss.png"))
    return summary


def reset_peak_rss() -> None:
    """Start this process's resident-memory high-water mark afresh (Linux: clear_refs 5), so the peak read
    after training is training's, not loading's; a no-op where the kernel does not offer it."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """This process's resident-memory high-water mark (VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plot_losses(summary: dict[str, Any], path: str) -> None:
    """The training loss by step, with the held-out loss before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(summary["losses"]) + 1), summary["losses"], label="train loss")
    if summary["eval_loss_before"] is not None:
        ax.axhline(summary["eval_loss_before"], color="gray", linestyle="--", label="held-out, before")
        ax.axhline(summary["eval_loss_after"], color="green", linestyle="--", label="held-out, after")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    what = f"LoRA r={summary['lora']['r']}" if summary.get("lora") else \
        f"soft prompt of {summary['prompt_tuning']['num_virtual_tokens']} tokens"
    ax.set_title(f"{what} on {os.path.basename(summary['data'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
