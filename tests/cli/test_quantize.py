"""`loom quantize` writes a checkpoint that `loom generate` and `loom eval ppl` load natively."""

from __future__ import annotations

import json
import os

import pytest

from loom.cli import main


@pytest.mark.parametrize("method,extra", [("rtn", []), ("gptq", ["--samples", "2", "--seq-len", "64"]),
                                          ("awq", ["--samples", "2", "--seq-len", "64"]),
                                          ("smoothquant", ["--samples", "2", "--seq-len", "64"])])
def test_quantize_then_generate_and_eval(tmp_path, capsys, tiny_gguf, method, extra):
    out = str(tmp_path / method)
    assert main(["quantize", "--model", tiny_gguf, "--method", method, "--bits", "4", "--group-size", "32",
                 "--out", out, "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method and report["weight_bytes"] < report["weight_bytes_dense_fp32"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["method"] == method
    assert main(["generate", "hello", "--model", out, "--max-tokens", "5", "--temperature", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "ppl", "--model", out, "--corpus", str(text), "--window", "64", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_quantize_refuses_a_group_that_does_not_divide(tmp_path, capsys, tiny_gguf):
    assert main(["quantize", "--model", tiny_gguf, "--group-size", "48", "--out", str(tmp_path / "x")]) == 2
    assert "does not divide" in capsys.readouterr().err
