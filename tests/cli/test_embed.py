"""`loom embed`: vectors equal to LLM.embed's, the similarity table, --file, --json, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from loom import LLM
from loom.default_model import default_embedding_model_path
from tests.cli.helpers import run

TEXTS = ["The cat sits on the mat", "A feline rests on a rug", "Stock markets fell sharply"]


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(default_embedding_model_path())


def test_json_vectors_equal_llm_embed(capsys, minilm, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text(TEXTS[1] + "\n\n" + TEXTS[2] + "\n")
    code, out, _ = run(capsys, "embed", TEXTS[0], "--file", str(lines), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["dimensions"] == 384 and [d["text"] for d in result["data"]] == TEXTS
    got = torch.tensor([d["embedding"] for d in result["data"]])
    assert torch.equal(got, minilm.embed(TEXTS))
    assert result["usage"]["prompt_tokens"] == sum(d["tokens"] for d in result["data"])


def test_text_output_and_similarities(capsys):
    code, out, err = run(capsys, "embed", *TEXTS)
    assert code == 0
    assert out.count("(384 dims)") == 3 and "cosine similarity:" in out
    table = out.splitlines()[out.splitlines().index("cosine similarity:") + 2:]  # after the column header
    sims = [[float(x) for x in line.split()[1:]] for line in table]
    assert sims[0][0] == 1.0 and sims[0][1] > sims[0][2]  # the two sentences about cats are the closest
    assert "texts/s" in err


def test_a_decoder_embeds_too(capsys, tiny_gguf):
    code, out, _ = run(capsys, "embed", "hello", "--model", tiny_gguf, "--pooling", "mean", "--no-normalize", "--json")
    assert code == 0
    want = LLM(tiny_gguf).embed("hello", pooling="mean", normalize=False)
    assert torch.equal(torch.tensor([json.loads(out)["data"][0]["embedding"]]), want)


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to embed"),
    (["x", "--dimensions", "64"], "does not support the dimensions parameter"),
    (["word " * 300], "this model embeds at most 256"),
    (["x", "--model", "/no/such/model"], "no such file or folder"),
])
def test_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, "embed", *argv)
    assert code == 2 and out == ""
    assert err.startswith("loom: error: ") and message in err and err.count("\n") == 1


def test_truncate_option(capsys, minilm):
    long = "word " * 300
    code, out, _ = run(capsys, "embed", long, "--truncate", "-1", "--json")
    assert code == 0
    assert torch.equal(torch.tensor([json.loads(out)["data"][0]["embedding"]]), minilm.embed(long, truncate=-1))
