"""`loom bench finetune`: both sides, each in its own process, train from the same initialization on the
same windows, so their losses agree step by step; every round repeats its losses; the JSON holds each
dtype's medians, spreads, ratio and fraction of the roof."""

from __future__ import annotations

import json

import pytest

from loom.bench.finetune import FinetuneBenchSettings, run_finetune_bench


def test_loom_and_peft_train_alike_in_their_own_processes(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Out, damned spot! out, I say! One: two: why, then, 'tis time to do't. " * 20)
    settings = FinetuneBenchSettings(model=tiny_folder, data=str(text), steps=3, seq_len=32, batch_size=2, r=4,
                                     lr=5e-3, threads=1)
    result = run_finetune_bench(settings, ["peft"], rounds=2, dtypes=["fp32"], progress=False)
    json.dumps(result)
    row = result["results"][0]
    assert row["dtype"] == "fp32" and row["max_loss_difference"] < 1e-4
    for side in ("loom", "peft"):
        rounds = result["runs"][side]["fp32"]["rounds"]
        assert len(rounds) == 2 and rounds[0]["losses"] == rounds[1]["losses"]  # each round starts afresh
        assert rounds[0]["losses"][-1] < rounds[0]["losses"][0]
        assert row[side]["tokens_per_s_min"] <= row[side]["tokens_per_s_median"] <= row[side]["tokens_per_s_max"]
        assert 0 < row[side]["fraction_of_compute_roof"] < 1
    assert result["best_vs_best"] == pytest.approx(row["loom_vs_peft"])


def test_unknown_peer_and_settings_are_refused(tiny_folder, tmp_path):
    settings = FinetuneBenchSettings(model=tiny_folder, data=str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="unknown peers"):
        run_finetune_bench(settings, ["vllm"])
    with pytest.raises(ValueError, match="dtypes"):
        run_finetune_bench(settings, ["peft"], dtypes=["fp16"])
