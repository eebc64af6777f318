"""One distillation run, end to end (``loom distill``): load the teacher and the student, measure the
student, train it against the teacher (in full, or through LoRA), measure again, save it.

The student is any folder or file loom loads whose vocabulary is the teacher's: a pruned checkpoint
(``loom prune``; its zeros are kept), a low-rank one (``loom compress lowrank``; its factors train), a
quantized one (``loom quantize``; frozen, so it trains through LoRA and is saved as base + adapter), or a
dense model. Quality is read two ways: the held-out windows' loss (``--eval-data`` or a split of the
data), and, with ``eval_corpus``, perplexity under the lab's protocol (GPTQ's: windows of 512 on the
first 20,480 tokens of the corpus), the same figure ``loom bench pruning`` reports.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from loom.finetune.data import as_tensors, batches, train_and_held_out
from loom.finetune.distill import DistillConfig, SparsityMask, decoder_parameters, distill_loss_fn
from loom.finetune.lora import LoraConfig, attach_lora
from loom.finetune.run import held_out_loss, peak_rss_bytes, reset_peak_rss
from loom.finetune.train import TrainConfig, train
from loom.tokenizer import load_tokenizer
from loom.weights.loader import load_model


@dataclass
class DistillRunConfig:
    """A run: teacher, student, data, objective, optimizer, and where to write."""

    teacher: str
    student: str
    data: str  # a text or .jsonl file, or a named corpus (britannica, hamlet)
    out: str
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: Optional[LoraConfig] = None  # None: every decoder-layer parameter of the student trains
    seq_len: int = 256
    batch_size: int = 4
    eval_fraction: float = 0.1
    eval_data: Optional[str] = None
    eval_corpus: Optional[str] = None  # a named corpus or text file for the lab's perplexity protocol
    eval_window: int = 512
    eval_max_tokens: int = 20480
    skip_tokens: int = 0  # a text's windows start after this many tokens (e.g. the span eval_corpus scores)
    seed: int = 0
    resume: Optional[str] = None  # a checkpoint folder written by an earlier run (train.save_every)


def _config_json(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def corpus_perplexity(model: Any, tokenizer: Any, corpus: str, window: int, max_tokens: int) -> float:
    from loom.eval.corpora import corpus_path
    from loom.eval.perplexity import perplexity

    with open(corpus_path(corpus), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False)
    return perplexity(model, ids, window, max_tokens=max_tokens, progress=False).perplexity


def run_distill(config: DistillRunConfig, progress: bool = True) -> dict[str, Any]:
    """Run it; returns the summary written to ``out/distill.json``."""
    student_cfg = _config_json(config.student) if os.path.isdir(config.student) else {}
    quantized = bool(student_cfg.get("quantization_config"))
    if quantized and config.lora is None:
        raise ValueError(f"{config.student} is quantized: its codes cannot take gradient steps, so it trains "
                         "through LoRA (give --lora-r)")
    teacher = load_model(config.teacher, weights="fp32")
    # A quantized student loads dequantized (the same values, dense), frozen under its adapter.
    student = load_model(config.student, weights="fp32")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the student's "
                         f"({student.config.vocab_size}): distillation compares their distributions token by token")
    tokenizer = load_tokenizer(config.student, student.metadata, student.config.eos_token_ids)
    teacher.model.requires_grad_(False).eval()
    model = student.model
    from loom.eval.corpora import corpus_path

    train_set, eval_set = train_and_held_out(corpus_path(config.data), tokenizer, config.seq_len, config.batch_size,
                                             config.eval_data, config.eval_fraction, config.seed, config.skip_tokens)
    torch.manual_seed(config.seed)

    def measure(m: Any) -> dict[str, Optional[float]]:
        loss = held_out_loss(m, eval_set, config.batch_size) if eval_set else None
        ppl = corpus_perplexity(m, tokenizer, config.eval_corpus, config.eval_window, config.eval_max_tokens) \
            if config.eval_corpus else None
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss is not None else None,
                "corpus_perplexity": ppl}

    mask = None
    if config.lora is not None:
        adapter = attach_lora(model, config.lora)
        parameters = adapter.parameters()
    else:
        adapter = None
        parameters = decoder_parameters(model)
        if student_cfg.get("pruning"):
            mask = SparsityMask(parameters)
    teacher_scores = measure(teacher.model)
    before = measure(model)
    data = (as_tensors(b) for b in batches(train_set, config.batch_size, config.seed))
    reset_peak_rss()
    start = time.perf_counter()
    logs = train(model, parameters, data, config.train, progress=progress,
                 loss_fn=distill_loss_fn(teacher.model, config.distill), after_step=mask,
                 checkpoint_dir=os.path.join(config.out, "checkpoint"), resume=config.resume)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    if mask is not None:
        mask.remove()
    after = measure(model)
    os.makedirs(config.out, exist_ok=True)
    if adapter is not None:
        adapter.save(config.out, base_model=config.student)
    else:
        from loom.weights.quantized_checkpoint import save_checkpoint

        # what the student is (its zeros, its factors) is recorded again, so the folder loads as it did
        save_checkpoint(model, config.out, None, tokenizer, pruning=student_cfg.get("pruning"),
                        lowrank=student_cfg.get("lowrank"))
    summary = {"teacher": config.teacher, "student": config.student, "data": config.data, "out": config.out,
               "eval_data": config.eval_data, "skip_tokens": config.skip_tokens,
               "training": "lora" if adapter is not None else "full",
               "trainable_parameters": sum(p.numel() for p in parameters),
               "kept_zeros": mask.zeros if mask is not None else None,
               "train_examples": len(train_set), "eval_examples": len(eval_set),
               "train_tokens": sum(log.tokens for log in logs), "train_seconds": seconds,
               "train_tokens_per_s": sum(log.tokens for log in logs) / seconds if seconds > 0 else None,
               "teacher_scores": teacher_scores, "before": before, "after": after,
               "eval_corpus": config.eval_corpus, "losses": [log.loss for log in logs],
               "distill": asdict(config.distill), "train": asdict(config.train),
               "lora": asdict(config.lora) if config.lora is not None else None,
               "seq_len": config.seq_len, "batch_size": config.batch_size, "train_peak_rss_bytes": peak}
    gap = None
    key = "corpus_perplexity" if config.eval_corpus else "eval_perplexity"
    t, b, a = teacher_scores[key], before[key], after[key]
    if t is not None and b is not None and a is not None and b != t:
        gap = (b - a) / (b - t)  # the fraction of the student's gap to the teacher closed
    summary["gap_recovered"] = gap
    with open(os.path.join(config.out, "distill.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def plot_recovery(runs: list[tuple[str, dict[str, Any]]], path: str) -> None:
    """Each student (label, its distill.json) before and after distillation, with its teacher as a line
    (perplexity on the evaluation corpus, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "corpus_perplexity" if runs[0][1].get("eval_corpus") else "eval_perplexity"
    fig, ax = plt.subplots(figsize=(max(7.5, 1.2 * len(runs)), 4.2))
    xs = range(len(runs))
    before = [s["before"][key] for _, s in runs]
    after = [s["after"][key] for _, s in runs]
    b1 = ax.bar([x - 0.2 for x in xs], before, 0.4, label="student before", color="#c44e52")
    b2 = ax.bar([x + 0.2 for x in xs], after, 0.4, label="after distillation", color="#55a868")
    ax.bar_label(b1, fmt="%.4g", fontsize=7)
    ax.bar_label(b2, fmt="%.4g", fontsize=7)
    teacher = runs[0][1]["teacher_scores"][key]
    ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher ({teacher:.2f})")
    ax.set_xticks(list(xs), [label for label, _ in runs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity ({runs[0][1].get('eval_corpus') or 'held-out'})")
    ax.set_title("Distillation from the dense model: what each compressed student gets back")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
