"""`loom compress lowrank` writes a factorized checkpoint that `loom generate` and `LLM` load; bad settings are
clear errors."""

from __future__ import annotations

import json
import os

import pytest

from loom.cli import main
from loom.layers.lowrank import FusedLinear, LowRankLinear
from loom.llm import LLM
from loom.sampling_params import SamplingParams


def test_lowrank_then_generate(tmp_path, capsys, tiny_gguf):
    out = str(tmp_path / "lowrank")
    assert main(["compress", "lowrank", "--model", tiny_gguf, "--keep", "0.5", "--method", "asvd", "--samples", "2",
                 "--seq-len", "32", "--out", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["method"] == "asvd" and 0.45 < report["fraction_kept"] <= 0.5
    assert len(report["layers"]) == 14 and all(r["output_error"] is None for r in report["layers"])
    with open(os.path.join(out, "config.json")) as f:
        record = json.load(f)["lowrank"]
    assert record["keep"] == 0.5 and record["calibration"]["samples"] == 2
    assert record["decoder_linear_params_kept"] == report["fraction_kept"]
    assert main(["generate", "hello", "--model", out, "--max-tokens", "5", "--temperature", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    llm = LLM(out)
    assert isinstance(llm.model.layers[0].attn.qkv_proj, FusedLinear)
    assert isinstance(llm.model.layers[1].mlp.down_proj, LowRankLinear)
    assert len(llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids) == 3


def test_svd_summary_line(tmp_path, capsys, tiny_gguf):
    out = str(tmp_path / "svd")
    assert main(["compress", "lowrank", "--model", tiny_gguf, "--keep", "0.9", "--targets", "q_proj,down_proj",
                 "--out", out]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: svd keep 0.9, 4 projections at ranks") and "parameters kept" in line


@pytest.mark.parametrize("args,message", [(["--keep", "0"], "keep must be in (0, 1]"),
                                          (["--targets", "lm_head"], "not decoder projections"),
                                          (["--keep", "0.001"], "leaves no rank")])
def test_bad_settings_are_clear_errors(tmp_path, capsys, tiny_gguf, args, message):
    assert main(["compress", "lowrank", "--model", tiny_gguf, *args, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
