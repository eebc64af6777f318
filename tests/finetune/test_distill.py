"""Distillation's objective against the naive formula on transformers' logits of the same weights, its
gradient, the pruned student's kept zeros, and a student that moves toward its teacher."""

from __future__ import annotations

import pytest
import torch

from loom.finetune import TrainConfig, lm_loss, train
from loom.finetune.distill import DistillConfig, SparsityMask, decoder_parameters, distill_loss_fn, kd_divergence
from loom.weights.loader import load_model
from tests.helpers import save_tiny_hf


def naive_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of sum_v p_t,v (log p_t,v - log p_s,v), written out."""
    total = torch.zeros((), dtype=torch.float64)
    for s_row, t_row in zip(student.double(), teacher.double()):
        p_t = torch.exp(t_row / temperature) / torch.exp(t_row / temperature).sum()
        p_s = torch.exp(s_row / temperature) / torch.exp(s_row / temperature).sum()
        total += (p_t * (p_t.log() - p_s.log())).sum()
    return temperature ** 2 * total / len(student)


def test_kd_divergence_is_the_formula():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 50, generator=gen) * 3, torch.randn(7, 50, generator=gen) * 3
    for temperature in (1.0, 2.0, 4.0):
        torch.testing.assert_close(kd_divergence(s, t, temperature).double(), naive_kd(s, t, temperature),
                                   rtol=1e-5, atol=1e-6)
    assert float(kd_divergence(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher HF, student HF, teacher loom, student loom): two different tiny random Llamas."""
    root = tmp_path_factory.mktemp("distill")
    hf_t = save_tiny_hf(str(root / "t"), seed=0)
    hf_s = save_tiny_hf(str(root / "s"), seed=1)
    return hf_t, hf_s, str(root / "t"), str(root / "s")


def test_loss_equals_the_formula_on_transformers_logits(pair):
    hf_t, hf_s, t_path, s_path = pair
    teacher, student = load_model(t_path, weights="fp32").model, load_model(s_path, weights="fp32").model
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (n,), generator=gen) for n in (9, 14)]
    labels = [s.clone() for s in seqs]
    labels[1][:5] = -100  # a prompt not trained on
    config = DistillConfig(temperature=2.0, alpha=0.7)
    ours = distill_loss_fn(teacher, config)(student, seqs, labels)
    rows_s, rows_t, targets = [], [], []
    with torch.no_grad():
        for ids, lab in zip(seqs, labels):
            ls, lt = hf_s(input_ids=ids[None]).logits[0, :-1], hf_t(input_ids=ids[None]).logits[0, :-1]
            keep = lab[1:] != -100
            rows_s.append(ls[keep])
            rows_t.append(lt[keep])
            targets.append(lab[1:][keep])
    s, t, y = torch.cat(rows_s), torch.cat(rows_t), torch.cat(targets)
    ce = torch.nn.functional.cross_entropy(s.double(), y)
    expected = 0.7 * naive_kd(s, t, 2.0) + 0.3 * ce
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    # alpha 0 is plain fine-tuning: exactly the causal-LM loss
    plain = distill_loss_fn(teacher, DistillConfig(alpha=0.0))(student, seqs, labels)
    torch.testing.assert_close(plain, lm_loss(student, seqs, labels))


def test_a_student_equal_to_its_teacher_has_nothing_to_learn(pair):
    _, _, t_path, _ = pair
    teacher, student = load_model(t_path, weights="fp32").model, load_model(t_path, weights="fp32").model
    params = decoder_parameters(student)
    seqs = [torch.randint(0, 128, (12,)) for _ in range(2)]
    loss = distill_loss_fn(teacher, DistillConfig(temperature=3.0, alpha=1.0))(student, seqs, None)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert max(float(p.grad.abs().max()) for p in params) < 1e-5


def windows(n: int = 20, batch: int = 4, length: int = 24):
    """Fresh random sequences in every batch: what the student learns is the teacher's function, not a text."""
    gen = torch.Generator().manual_seed(5)
    return [(list(torch.randint(0, 128, (batch, length), generator=gen)), None) for _ in range(n)]


def test_distillation_moves_the_student_toward_the_teacher_and_keeps_its_zeros(pair):
    """A 50%-pruned student (magnitude, per row) trained in full with alpha 1: the KL to the teacher on
    held-out sequences falls, and every pruned weight is still exactly zero after the steps."""
    _, _, t_path, s_path = pair
    teacher, student = load_model(t_path, weights="fp32").model, load_model(t_path, weights="fp32").model
    with torch.no_grad():  # prune the teacher's copy: the student starts near it, but worse
        for layer in student.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(p.abs() >= p.abs().median(dim=1, keepdim=True).values)
    params = decoder_parameters(student)
    mask = SparsityMask(params)
    zeros_before = [(p.detach() == 0).clone() for p, _ in mask.pairs]
    assert mask.zeros > 0
    held = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(9)) for _ in range(3)]
    kd = distill_loss_fn(teacher, DistillConfig(temperature=1.0, alpha=1.0))
    with torch.no_grad():
        before = float(kd(student, held, None))
    logs = train(student, params, windows(), TrainConfig(lr=1e-3, max_steps=20), loss_fn=kd, after_step=mask)
    mask.remove()
    with torch.no_grad():
        after = float(kd(student, held, None))
    assert logs[-1].loss < logs[0].loss and after < 0.8 * before, (before, after)
    print("KL", before, after)
    for (p, _), was_zero in zip(mask.pairs, zeros_before):
        assert bool((p.detach()[was_zero] == 0).all())  # the pattern survives, exactly
        assert bool((p.detach()[~was_zero] != 0).all())
    changed = sum(int((p.detach() != q).sum()) for p, q in zip(
        params, load_model(t_path, weights="fp32").model.layers.parameters()))
    assert changed > 0


def test_config_is_checked():
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
