"""One fine-tuning run, end to end: load the base (dense fp32), attach LoRA (or a soft prompt, or train every
parameter), read and split the data, measure held-out loss, train, measure again, save the adapter (PEFT's
format) or the model, the log and the loss curve.

With ``nproc > 1`` (or as a rank of torchrun's world) the run is data-parallel (``parallel.py``): DDP or
FSDP over the ranks, ``batch_size`` examples per rank (the global batch ``nproc x batch_size``), rank 0
writing everything."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from loom.finetune.data import as_tensors, batches, train_and_held_out
from loom.finetune.lora import LoraConfig, attach_lora, quantize_base_nf4
from loom.finetune.parallel import (STRATEGIES, RankMemory, TokenLossSum, World, data_parallel_loss,
                                    full_trainable_state, mean_loss, rank_batches, rank_memory, spawn, world_from_env,
                                    wrap)
from loom.finetune.prompt_tuning import PromptTuningConfig, attach_prompt_tuning
from loom.finetune.train import LossFn, TrainConfig, lm_loss, train
from loom.tokenizer import load_tokenizer
from loom.weights.loader import load_model, release_freed_memory

METHODS = ("lora", "prompt-tuning", "full")


@dataclass
class FinetuneConfig:
    """A run: the base model, the data, the adapter and the optimizer settings, and where to write."""

    model: str
    data: str
    out: str
    method: str = "lora"  # "prompt-tuning" (a soft prompt of N virtual tokens; Lester et al. 2021), "full"
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
    nproc: int = 1  # data-parallel processes spawned on this machine (under torchrun: its world)
    parallel: str = "ddp"  # with more than one rank: "ddp" or "fsdp"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.parallel not in STRATEGIES:
            raise ValueError(f"parallel must be one of {', '.join(STRATEGIES)}, got {self.parallel!r}")
        if self.nproc < 1:
            raise ValueError(f"nproc must be positive, got {self.nproc}")
        if self.qlora and self.method == "full":
            raise ValueError("qlora freezes an NF4 base under LoRA adapters; full fine-tuning trains dense weights")

    def check_world(self, world: World) -> None:
        """Refuse what a data-parallel run of ``world.size`` ranks does not do, naming it."""
        if world.size == 1:
            return
        if self.method == "prompt-tuning":
            raise ValueError("data-parallel runs train LoRA or the full model (--method lora or full), "
                             "not a soft prompt")
        if self.parallel == "fsdp" and self.qlora:
            raise ValueError("FSDP shards dense weights; QLoRA's NF4 base runs data-parallel with --parallel ddp")
        if self.parallel == "fsdp" and (self.train.save_every or self.resume):
            raise ValueError("resumable checkpoints hold whole tensors; with --parallel fsdp leave out "
                             "--save-every and --resume (or use ddp)")
        if self.nproc not in (1, world.size):
            raise ValueError(f"--nproc {self.nproc} under a world of {world.size} ranks (torchrun's): give one "
                             "or the other")


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
    """Run it; returns the summary written to ``out/finetune.json``. With ``config.nproc > 1`` this process
    spawns the ranks (gloo on 127.0.0.1) and reads back rank 0's summary; a process that torchrun started
    (RANK and WORLD_SIZE set) runs as its rank of torchrun's world."""
    world = world_from_env()
    if world is None and config.nproc > 1:
        config.check_world(World(0, config.nproc))  # refused here, not in every rank
        spawn(_spawned_rank, config.nproc, config, progress)
        with open(os.path.join(config.out, "finetune.json"), encoding="utf-8") as f:
            return json.load(f)
    return run_rank(config, world or World(), progress)


def _spawned_rank(world: World, config: FinetuneConfig, progress: bool) -> None:
    run_rank(config, world, progress)


@dataclass
class Trainee:
    """What a run trains: its adapter (None: the whole model), the trainable parameters (read when called:
    FSDP replaces them by shards), the loss, and the first label a sequence predicts."""

    adapter: Any
    parameters: Callable[[], list[torch.nn.Parameter]]
    loss_fn: LossFn
    first: int


def attach(config: FinetuneConfig, model: Any, tokenizer: Any) -> Trainee:
    if config.method == "prompt-tuning":
        prompt = attach_prompt_tuning(model, config.prompt_tuning, tokenizer)
        return Trainee(prompt, prompt.parameters, prompt.loss, 0)
    if config.method == "full":
        model.requires_grad_(True)
        return Trainee(None, lambda: [p for p in model.parameters() if p.requires_grad], lm_loss, 1)
    lora = attach_lora(model, config.lora)
    return Trainee(lora, lora.parameters, lm_loss, 1)


def run_rank(config: FinetuneConfig, world: World, progress: bool = True) -> dict[str, Any]:
    """The run on this rank of ``world`` (all of it in a single process); rank 0 writes the results."""
    config.check_world(world)
    loaded = load_model(config.model, weights="fp32")
    tokenizer = load_tokenizer(config.model, loaded.metadata, loaded.config.eos_token_ids)
    model = loaded.model
    global_batch = config.batch_size * world.size
    train_set, eval_set = train_and_held_out(config.data, tokenizer, config.seq_len, global_batch,
                                             config.eval_data, config.eval_fraction, config.seed)
    torch.manual_seed(config.seed + world.rank)  # each rank's own dropout masks, as different examples get
    base_bytes = None
    if config.qlora:
        base_bytes = quantize_base_nf4(model)
        release_freed_memory()  # the fp32 weights just replaced: give their pages back
    trainee = attach(config, model, tokenizer)
    wrapped, loss_fn, eval_fn = None, trainee.loss_fn, trainee.loss_fn
    if world.size > 1:
        wrapped = wrap(model, config.parallel, world)
        loss_fn, eval_fn = data_parallel_loss(wrapped, world), mean_loss(wrapped)
    before = held_out_loss(model, eval_set, config.batch_size, eval_fn, trainee.first) if eval_set else None
    data = (as_tensors(b) for b in rank_batches(batches(train_set, global_batch, config.seed), world))
    memory: list[RankMemory] = []
    reset_peak_rss()
    start = time.perf_counter()
    logs = train(model, trainee.parameters(), data, config.train, progress=progress, loss_fn=loss_fn,
                 checkpoint_dir=os.path.join(config.out, "checkpoint"), resume=config.resume,
                 world=world if world.size > 1 else None,
                 on_finish=lambda opt: memory.append(rank_memory(wrapped or model, opt, world.rank)))
    seconds = time.perf_counter() - start
    memory[0].peak_rss_bytes = peak_rss_bytes()  # training's peak: model, activations, gradients, optimizer
    after = held_out_loss(model, eval_set, config.batch_size, eval_fn, trainee.first) if eval_set else None
    ranks = world.gather(memory[0])
    save_trained(config, world, model, trainee, wrapped, tokenizer)
    summary = {"model": config.model, "data": config.data, "out": config.out,
               "train_examples": len(train_set), "eval_examples": len(eval_set),
               "method": config.method, "trainable_parameters": sum(p.numel() for p in trainee.parameters()),
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
               "nf4_linear_bytes": base_bytes, "train_peak_rss_bytes": memory[0].peak_rss_bytes,
               "parallel": {"strategy": config.parallel if world.size > 1 else None, "world_size": world.size,
                            "global_batch_size": global_batch, "ranks": [m.to_dict() for m in ranks]}}
    if world.is_main:
        with open(os.path.join(config.out, "finetune.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        plot_losses(summary, os.path.join(config.out, "loss.png"))
    return summary


def save_trained(config: FinetuneConfig, world: World, model: Any, trainee: Trainee, wrapped: Any,
                 tokenizer: Any) -> None:
    """Rank 0 writes the adapter (PEFT's format) or, for full fine-tuning, the model (a folder loom and HF
    load). Under FSDP every rank first all-gathers the trained tensors, which rank 0 loads into a fresh,
    unsharded copy of the model to write."""
    adapter = trainee.adapter
    if wrapped is not None and config.parallel == "fsdp":
        state = full_trainable_state(wrapped)
        if not world.is_main:
            return
        model = load_model(config.model, weights="fp32").model
        adapter = attach_lora(model, config.lora) if config.method == "lora" else None
        unexpected = TokenLossSum(model).load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"the gathered tensors {unexpected[:3]} are not the model's")
    if not world.is_main:
        return
    if config.method == "full":
        from loom.weights.quantized_checkpoint import save_checkpoint

        save_checkpoint(model, config.out, None, tokenizer)
    else:
        adapter.save(config.out, base_model=config.model)


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
    if summary.get("lora"):
        what = f"LoRA r={summary['lora']['r']}"
    elif summary.get("prompt_tuning"):
        what = f"soft prompt of {summary['prompt_tuning']['num_virtual_tokens']} tokens"
    else:
        what = "full fine-tuning"
    if summary.get("parallel", {}).get("strategy"):
        what += f", {summary['parallel']['strategy'].upper()} x {summary['parallel']['world_size']}"
    ax.set_title(f"{what} on {os.path.basename(summary['data'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
