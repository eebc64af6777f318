"""`loom prune` writes a checkpoint that `loom generate` and `LLM` load; bad targets are clear errors."""

from __future__ import annotations

import json
import os
import re

import pytest

from loom.cli import main
from loom.llm import LLM
from loom.sampling_params import SamplingParams

CALIB = ["--samples", "2", "--seq-len", "32"]


@pytest.mark.parametrize("method,target,quant", [("sparsegpt", ["--pattern", "2:4"], ["--bits", "4", "--group-size", "32"]),
                                                 ("wanda", ["--sparsity", "0.5"], []),
                                                 ("magnitude", ["--pattern", "4:8"], ["--bits", "8"])])
def test_prune_then_generate(tmp_path, capsys, tiny_gguf, method, target, quant):
    out = str(tmp_path / method)
    assert main(["prune", "--model", tiny_gguf, "--method", method, *target, *quant, *CALIB, "--out", out,
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method and report["linear_sparsity"] >= 0.5
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["pruning"]["method"] == method and cfg["pruning"]["sparsity"] == 0.5
    assert ("quantization_config" in cfg) == bool(quant)
    if method != "magnitude":
        assert cfg["pruning"]["calibration"]["samples"] == 2
    assert main(["generate", "hello", "--model", out, "--max-tokens", "5", "--temperature", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    llm = LLM(out)
    assert len(llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("args,message", [(["--sparsity", "1.0"], r"sparsity must be in \[0, 1\)"),
                                          (["--sparsity", "-0.2"], r"sparsity must be in \[0, 1\)"),
                                          (["--pattern", "4:4"], "0 < N < M"),
                                          (["--pattern", "2by4"], "looks like 2:4"),
                                          (["--pattern", "2:3"], "does not divide the input size 64"),
                                          (["--pattern", "2:4", "--bits", "4", "--group-size", "48"], "does not divide")])
def test_bad_targets_are_clear_errors(tmp_path, capsys, tiny_gguf, args, message):
    assert main(["prune", "--model", tiny_gguf, "--method", "magnitude", *args, "--out", str(tmp_path / "x")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("args,message", [([], "one of the arguments --sparsity --pattern is required"),
                                          (["--sparsity", "0.5", "--pattern", "2:4"], "not allowed with")])
def test_exactly_one_of_sparsity_and_pattern(tmp_path, capsys, tiny_gguf, args, message):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", tiny_gguf, *args, "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and message in capsys.readouterr().err
