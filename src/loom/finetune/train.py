"""The training loop: causal-LM cross-entropy on token windows, AdamW, warmup then cosine decay, gradient
accumulation and clipping; what ``loom finetune`` and the Python API run.

The loss of a batch is HF's: the mean over every predicted token (each window predicts its tokens 1..T-1
from those before), with positions whose label is masked (``-100``, e.g. the prompt of a chat example)
left out. The forward is loom's own module path (``Transformer.logits`` over the windows as one flat
batch, each attending causally over itself), whose elementwise steps run their PyTorch twins when a
gradient is wanted (``layers/fused.use_native``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

if TYPE_CHECKING:
    from loom.finetune.parallel import World

IGNORE = -100  # a label that is not trained on (HF's convention)


@dataclass
class TrainConfig:
    """Optimizer and schedule (the defaults are PEFT's LoRA examples': AdamW 2e-4, no weight decay)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 100  # optimizer steps
    schedule: str = "cosine"  # "cosine" (to 0 at max_steps), "linear" or "constant", after the warmup
    grad_accum: int = 1  # batches per optimizer step
    max_grad_norm: Optional[float] = 1.0
    activation_checkpointing: bool = False  # keep only each layer's input; recompute inside it in backward
    bf16: bool = False  # forward and backward under CPU autocast to bf16 (AMX); weights and optimizer in fp32
    save_every: int = 0  # write a resumable checkpoint every this many optimizer steps (0: never)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("max_steps and grad_accum must be positive, warmup_steps not negative")

    def lr_factor(self, step: int) -> float:
        """The learning rate's multiplier at optimizer step ``step`` (0-based): linear warmup, then the
        schedule (cosine: 0.5 (1 + cos(pi progress)), as HF's get_cosine_schedule_with_warmup)."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


Sequences = Union[torch.Tensor, Sequence[torch.Tensor]]  # [B, T], or B sequences of their own lengths


class CheckpointedLayer(torch.nn.Module):
    """A decoder layer whose activations are recomputed in the backward instead of kept (activation
    checkpointing, Chen et al. 2016): memory for one layer's input instead of all its intermediates."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: object) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False)
        return self.layer(*args)


def checkpoint_layers(model: Transformer, on: bool = True) -> None:
    """Wrap (or unwrap) every decoder layer of ``model`` in a CheckpointedLayer, in place."""
    for i, layer in enumerate(model.layers):
        if on and not isinstance(layer, CheckpointedLayer):
            model.layers[i] = CheckpointedLayer(layer)
        elif not on and isinstance(layer, CheckpointedLayer):
            model.layers[i] = layer.layer


def predicted_rows(lengths: Sequence[int], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a flat batch of sequences (``lengths``) that predict a trained label, and those labels:
    each sequence's rows 0..n-2 predict its tokens 1..n-1; IGNORE labels are left out."""
    rows, targets = [], []
    start = 0
    for n, lab in zip(lengths, labels):
        nxt = torch.as_tensor(lab)[1:]
        keep = (nxt != IGNORE).nonzero().squeeze(1)
        rows.append(start + keep)
        targets.append(nxt[keep])
        start += n
    return torch.cat(rows), torch.cat(targets)


def lm_loss(model: Transformer, input_ids: Sequences, labels: Sequences | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy of predicting each sequence's next tokens; ``input_ids`` [B, T] or a list of
    1-D sequences, ``labels`` alike (default: the inputs; IGNORE where not trained). The sequences run as one
    flat batch, each attending causally over itself; the output layer runs on the predicting rows only
    (its [rows, vocab] logits are the largest activation of a small model's step). ``reduction="sum"``: the
    sum over the predicted tokens instead (what a data-parallel rank contributes; ``predicted_tokens``
    counts them)."""
    seqs = list(input_ids)
    labs = seqs if labels is None else list(labels)
    lengths = [len(s) for s in seqs]
    hidden = model(torch.cat(seqs), AttentionMetadata.uncached(lengths))
    rows, targets = predicted_rows(lengths, labs)
    return F.cross_entropy(model.compute_logits(hidden[rows]).float(), targets, reduction=reduction)


def predicted_tokens(input_ids: Sequences, labels: Sequences | None = None) -> int:
    """How many tokens ``lm_loss`` averages over: every sequence's labels 1..n-1 that are not IGNORE."""
    labs = list(input_ids) if labels is None else list(labels)
    return sum(int((torch.as_tensor(lab)[1:] != IGNORE).sum()) for lab in labs)


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int


LossFn = Callable[[Transformer, Sequences, Optional[Sequences]], torch.Tensor]
CHECKPOINT = "checkpoint.pt"


def save_training_state(folder: str, step: int, parameters: Sequence[torch.nn.Parameter],
                        optimizer: torch.optim.Optimizer, schedule: Any, logs: list[StepLog]) -> str:
    """Everything a run needs to go on from optimizer step ``step`` exactly as if never stopped: the trainable
    parameters, AdamW's moments, the schedule, the RNG, the log. Written atomically (a crash mid-write
    leaves the previous checkpoint)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CHECKPOINT)
    state = {"step": step, "parameters": [p.detach().clone() for p in parameters],
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "rng": torch.get_rng_state(), "logs": [vars(log) for log in logs]}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_training_state(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CHECKPOINT) if os.path.isdir(folder) else folder
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training checkpoint at {path}")
    return torch.load(path, weights_only=False)


def restore_training_state(resume: str, parameters: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                           schedule: Any) -> tuple[int, list[StepLog]]:
    """Load a checkpoint into the parameters, optimizer, schedule and RNG; returns (its step, its log)."""
    state = load_training_state(resume)
    if len(state["parameters"]) != len(parameters) or any(
            a.shape != b.shape for a, b in zip(state["parameters"], parameters)):
        raise ValueError(f"{resume}: its trainable parameters do not match this run's (another adapter "
                         "or model?)")
    with torch.no_grad():
        for p, saved in zip(parameters, state["parameters"]):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return state["step"], [StepLog(**log) for log in state["logs"]]


def train(model: Transformer, parameters: Sequence[torch.nn.Parameter],
          batches: Iterable[tuple[Sequences, Sequences | None]], config: TrainConfig,
          on_step: Callable[[StepLog], None] | None = None, progress: bool = False,
          loss_fn: LossFn = lm_loss, after_step: Callable[[], None] | None = None,
          checkpoint_dir: str | None = None, resume: str | None = None, world: Optional["World"] = None,
          on_finish: Callable[[torch.optim.Optimizer], None] | None = None) -> list[StepLog]:
    """Train ``parameters`` of ``model`` on ``batches`` of (input_ids, labels or None; see ``lm_loss``) for
    ``config.max_steps`` optimizer steps (``grad_accum`` batches each; the loss of a step is their mean).
    ``loss_fn`` is the objective (default the causal-LM cross-entropy; distillation passes its own);
    ``after_step`` runs after each optimizer step (e.g. to keep a pruned weight's zeros). With
    ``config.save_every`` a checkpoint goes to ``checkpoint_dir`` every that many steps; ``resume`` (a
    checkpoint folder or file) restores one and skips the batches it had consumed, so a resumed run's
    losses and weights equal an uninterrupted one's. In a data-parallel ``world`` (``parallel.py``) each
    rank's ``loss_fn`` returns its share of the global batch's loss (the shares sum, over ranks, to the
    world size times the global mean: DDP and FSDP average gradients); the log holds the global mean and
    token count, and only rank 0 shows progress and writes checkpoints. ``on_finish`` sees the optimizer
    after the last step (its state's size, say). Returns the log of every step."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    it: Iterator = iter(batches)
    first, logs = restore_training_state(resume, parameters, optimizer, schedule) if resume is not None else (0, [])
    for _ in range(first * config.grad_accum):  # the batches already trained on
        next(it)
    checkpoint_layers(model, config.activation_checkpointing)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)
    main = world is None or world.rank == 0
    with tqdm(total=config.max_steps, initial=first, disable=not (progress and main), desc="train") as bar:
        for step in range(first, config.max_steps):
            total, tokens, started = 0.0, 0, time.perf_counter()
            for _ in range(config.grad_accum):
                input_ids, labels = next(it)
                with autocast:
                    loss = loss_fn(model, input_ids, labels) / config.grad_accum
                loss.backward()
                total += loss.item()
                tokens += sum(len(s) for s in input_ids)
            norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm if config.max_grad_norm else math.inf)
            if hasattr(norm, "full_tensor"):  # FSDP's sharded gradients: the norm is a DTensor
                norm = norm.full_tensor()
            if world is not None:
                total, tokens = world.mean_and_sum(total, tokens)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            log = StepLog(step, total, lr, float(norm), tokens)
            logs.append(log)
            if on_step is not None:
                on_step(log)
            bar.set_postfix(loss=f"{total:.4f}", tokens_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
            bar.update(1)
            if config.save_every and checkpoint_dir and main and (step + 1) % config.save_every == 0 \
                    and step + 1 < config.max_steps:
                save_training_state(checkpoint_dir, step + 1, parameters, optimizer, schedule, logs)
    if on_finish is not None:
        on_finish(optimizer)
    checkpoint_layers(model, False)
    model.eval()
    return logs
