"""`loom finetune --nproc 2`: two spawned ranks (DDP, LoRA) train, rank 0 writes the adapter and the summary,
and the command prints each rank's share of parameters + optimizer state; a refused combination is an
error that names it."""

from __future__ import annotations

import json

from tests.cli.helpers import run


def test_finetune_nproc_2_ddp_lora(capsys, tiny_gguf, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20)
    args = ["finetune", "--model", tiny_gguf, "--data", str(text), "--steps", "4", "--seq-len", "24",
            "--lr", "3e-3", "--r", "4", "--eval-fraction", "0.2"]
    code, out, err = run(capsys, *args, "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--nproc", "2")
    assert code == 0, err
    assert "DDP over 2 ranks, global batch 4" in out
    assert out.count("100.0% of one rank's") == 2  # DDP: each rank a whole copy
    summary = json.loads((tmp_path / "ddp" / "finetune.json").read_text())
    written = {p.name for p in (tmp_path / "ddp").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.png"} <= written
    code, out, err = run(capsys, *args, "--out", str(tmp_path / "one"), "--batch-size", "4", "--json")
    assert code == 0, err
    one = json.loads(out)
    assert one["parallel"]["strategy"] is None and summary["parallel"]["strategy"] == "ddp"
    for a, b in zip(summary["losses"], one["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_finetune_refuses_a_soft_prompt_over_ranks(capsys, tiny_gguf, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("words " * 200)
    code, out, err = run(capsys, "finetune", "--model", tiny_gguf, "--data", str(text), "--out", str(tmp_path / "x"),
                         "--method", "prompt-tuning", "--nproc", "2")
    assert code != 0 and "not a soft prompt" in err
