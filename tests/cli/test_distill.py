"""`loom distill` on a tiny model: a 2:4-pruned student trains against its dense teacher, its held-out
perplexity falls, the saved student is still 2:4 and loads; a quantized student trains through LoRA only;
a checkpoint resumes."""

from __future__ import annotations

import json
import os

import torch

from loom.llm import LLM
from tests.cli.helpers import run

TRAIN = ["--steps", "4", "--seq-len", "16", "--batch-size", "2", "--lr", "3e-3", "--alpha", "0.5", "--json"]


def text(tmp_path) -> str:
    path = tmp_path / "train.txt"
    path.write_text("the quick brown fox jumps over the lazy dog; " * 40)
    return str(path)


def test_a_pruned_student_learns_and_stays_2_4(capsys, tmp_path, tiny_gguf):
    student = str(tmp_path / "w24")
    code, _, err = run(capsys, "prune", "--model", tiny_gguf, "--method", "magnitude", "--pattern", "2:4",
                       "--out", student)
    assert code == 0, err
    out = str(tmp_path / "distilled")
    code, stdout, err = run(capsys, "distill", "--teacher", tiny_gguf, "--student", student, "--data", text(tmp_path),
                            "--out", out, "--save-every", "2", *TRAIN)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["training"] == "full" and s["kept_zeros"] > 0
    assert s["losses"][-1] < s["losses"][0]
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    assert s["gap_recovered"] > 0  # (past 1 here: the data term fits this repeated text beyond the teacher)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["pruning"]["pattern"] == "2:4"
    llm = LLM(out)
    for name, w in llm.model.named_parameters():
        if name.startswith("layers.") and w.dim() == 2:
            groups = (w.detach().reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2, name  # still 2:4 after training
    assert os.path.isfile(os.path.join(out, "checkpoint", "checkpoint.pt"))
    # the same run resumed from its step-2 checkpoint ends where the whole run ended
    code, stdout, err = run(capsys, "distill", "--teacher", tiny_gguf, "--student", student, "--data", text(tmp_path),
                            "--out", str(tmp_path / "resumed"), "--resume", os.path.join(out, "checkpoint"), *TRAIN)
    assert code == 0, err
    assert json.loads(stdout)["losses"] == s["losses"]
    torch.testing.assert_close(LLM(str(tmp_path / "resumed")).model.logits(torch.arange(8)),
                               llm.model.logits(torch.arange(8)), rtol=0, atol=0)


def test_a_quantized_student_trains_through_lora(capsys, tmp_path, tiny_gguf):
    student = str(tmp_path / "q4")
    code, _, err = run(capsys, "quantize", "--model", tiny_gguf, "--method", "rtn", "--bits", "4", "--group-size", "32",
                       "--out", student)
    assert code == 0, err
    code, _, err = run(capsys, "distill", "--teacher", tiny_gguf, "--student", student, "--data", text(tmp_path),
                       "--out", str(tmp_path / "x"), *TRAIN)
    assert code != 0 and "trains through LoRA" in err
    code, stdout, err = run(capsys, "distill", "--teacher", tiny_gguf, "--student", student, "--data", text(tmp_path),
                            "--out", str(tmp_path / "adapter"), "--lora-r", "4", *TRAIN)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["training"] == "lora" and s["after"]["eval_loss"] < s["before"]["eval_loss"]
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
