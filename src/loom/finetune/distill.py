"""Knowledge distillation: a student learns the teacher's next-token distributions (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network").

The loss of a batch, over every predicted position i (labels IGNORE left out):

    L = alpha * T^2 * mean_i KL( softmax(z_t,i / T) || softmax(z_s,i / T) ) + (1 - alpha) * CE(z_s, y)

z_t the teacher's logits (computed on the fly, without gradient), z_s the student's, T the temperature
(softening both distributions; the T^2 keeps the soft term's gradient on the scale of the hard one's as T
changes, Hinton et al. section 2). alpha = 1 is pure distillation, alpha = 0 plain fine-tuning.

The students are what the compression lab makes: a pruned copy (its zeros kept: ``SparsityMask``), a
low-rank copy (its factors trained), or a quantized copy (frozen, with LoRA on top) - trained in full or
through LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loom.finetune.train import Sequences, predicted_rows
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer


@dataclass
class DistillConfig:
    """The distillation objective's two knobs (Hinton et al.)."""

    temperature: float = 2.0
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha on the data's cross-entropy

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)), in fp32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def distill_loss_fn(teacher: Transformer, config: DistillConfig) -> Callable[..., torch.Tensor]:
    """The loss ``train`` calls: (student, input_ids, labels) -> L above; the teacher runs without gradient
    on the same flat batch."""

    def loss(student: Transformer, input_ids: Sequences, labels: Sequences | None = None) -> torch.Tensor:
        seqs = list(input_ids)
        labs = [torch.as_tensor(s) for s in (seqs if labels is None else labels)]
        lengths = [len(s) for s in seqs]
        flat = torch.cat(seqs)
        rows, targets = predicted_rows(lengths, labs)
        meta = AttentionMetadata.uncached(lengths)
        with torch.no_grad():
            teacher_logits = teacher.compute_logits(teacher(flat, meta)[rows])
        student_logits = student.compute_logits(student(flat, meta)[rows]).float()
        total = student_logits.new_zeros(())
        if config.alpha > 0:
            total = total + config.alpha * kd_divergence(student_logits, teacher_logits, config.temperature)
        if config.alpha < 1:
            total = total + (1 - config.alpha) * F.cross_entropy(student_logits, targets)
        return total

    return loss


class SparsityMask:
    """Keeps a pruned student's zeros zero while it trains: each weight's gradient is masked (so AdamW's
    moments stay zero there and its update is exactly zero) and the mask is applied again after every
    step, so a 2:4 or 50% pattern survives training bit for bit."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.pairs = [(p, p.detach() != 0) for p in parameters if bool((p.detach() == 0).any())]
        self.handles = [p.register_hook(lambda g, m=mask: g * m) for p, mask in self.pairs]

    def __call__(self) -> None:
        with torch.no_grad():
            for p, mask in self.pairs:
                p.mul_(mask)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    @property
    def zeros(self) -> int:
        return sum(int((~m).sum()) for _, m in self.pairs)


def decoder_parameters(model: Transformer) -> list[nn.Parameter]:
    """Every parameter of the decoder layers (linears, norms; for a low-rank student its factors): what
    full training of a student trains. The embedding and output layer stay frozen (they are not what
    pruning, factorization or quantization changed)."""
    model.requires_grad_(False)
    params = []
    for layer in model.layers:
        for p in layer.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
                params.append(p)
    return params
