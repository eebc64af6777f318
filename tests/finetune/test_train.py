"""The training loop's own promises: a resumed run equals an uninterrupted one bit for bit, a checkpoint of
other parameters is refused, and bf16 autocast trains the same model to nearly the same losses."""

from __future__ import annotations

import pytest
import torch

from loom.finetune import LoraConfig, TrainConfig, attach_lora, train
from loom.finetune.train import load_training_state
from loom.weights.loader import load_model
from tests.helpers import save_tiny_hf


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train") / "base"
    save_tiny_hf(str(folder))
    return str(folder)


def data(n: int = 16):
    gen = torch.Generator().manual_seed(0)
    texts = torch.randint(0, 128, (4, 16), generator=gen)
    return [(list(texts[torch.randint(0, 4, (2,), generator=gen)]), None) for _ in range(n)]


def fresh(base: str):
    model = load_model(base, weights="fp32").model
    return model, attach_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))  # dropout: the RNG matters


def test_a_resumed_run_equals_an_uninterrupted_one(base, tmp_path):
    config = TrainConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, max_steps=6, grad_accum=2, save_every=3)
    torch.manual_seed(1)
    model, lora = fresh(base)
    whole = train(model, lora.parameters(), iter(data()), config, checkpoint_dir=str(tmp_path / "a"))
    assert load_training_state(str(tmp_path / "a"))["step"] == 3  # written at step 3, not at the end

    torch.manual_seed(1)
    model2, lora2 = fresh(base)
    # a run killed during step 4 (its data runs out there), after the checkpoint of step 3
    with pytest.raises(StopIteration):
        train(model2, lora2.parameters(), iter(data()[:7]), config, checkpoint_dir=str(tmp_path / "b"))
    torch.manual_seed(123)  # whatever the process did since: the checkpoint restores the RNG
    model3, lora3 = fresh(base)
    resumed = train(model3, lora3.parameters(), iter(data()), config, resume=str(tmp_path / "b"))
    assert [log.loss for log in resumed] == [log.loss for log in whole]
    for p, q in zip(lora.parameters(), lora3.parameters()):
        assert torch.equal(p, q)


def test_a_checkpoint_of_other_parameters_is_refused(base, tmp_path):
    model, lora = fresh(base)
    train(model, lora.parameters(), iter(data()), TrainConfig(max_steps=3, save_every=1), checkpoint_dir=str(tmp_path))
    model2 = load_model(base, weights="fp32").model
    other = attach_lora(model2, LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(ValueError, match="do not match"):
        train(model2, other.parameters(), iter(data()), TrainConfig(max_steps=3), resume=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        train(model2, other.parameters(), iter(data()), TrainConfig(max_steps=3), resume=str(tmp_path / "none"))


def test_bf16_autocast_trains_like_fp32(base):
    runs = {}
    for bf16 in (False, True):
        model = load_model(base, weights="fp32").model
        lora = attach_lora(model, LoraConfig(r=4, lora_alpha=8))
        logs = train(model, lora.parameters(), iter(data()), TrainConfig(lr=3e-3, max_steps=12, bf16=bf16))
        runs[bf16] = [log.loss for log in logs]
        assert all(p.dtype == torch.float32 for p in lora.parameters())  # the master weights stay fp32
    assert runs[True][-1] < runs[True][0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=2e-2, atol=0)
    assert runs[True] != runs[False]  # and autocast really ran in bf16
