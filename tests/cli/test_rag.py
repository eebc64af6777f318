"""`loom rag index / query / eval` with the real embedding model on a small folder, run through the
command's own parser (loom.cli.rag.main, what `python -m loom.cli.rag` runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loom.cli import rag as rag_cli
from loom.default_model import default_embedding_model_path

DOCS = {
    "ships.txt": "The Mary Rose was a warship of the English Tudor navy. She sank in 1545 in the Solent.\n" * 3,
    "notes/garden.md": "# Garden\n\nTomatoes need full sun and regular watering. Basil grows well beside them.\n" * 3,
    "notes/bread.txt": "Sourdough bread rises slowly because wild yeast ferments the dough overnight.\n" * 3,
}


def rag(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rag_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def index(docs, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("idx") / "index")
    assert rag_cli.main(["index", str(docs), "--index", path, "--no-progress", "--chunk-tokens", "32",
                         "--overlap", "8"]) == 0
    return path


def test_index_reports_and_reindexes_nothing_when_unchanged(capsys, docs, index):
    code, out, err = rag(capsys, "index", str(docs), "--index", index, "--chunk-tokens", "32", "--overlap", "8",
                         "--json")
    assert code == 0
    result = json.loads(out)
    assert result["stats"]["files_embedded"] == 0 and result["stats"]["files_reused"] == 3
    assert result["embedder"]["name"] == "all-MiniLM-L6-v2" and result["chunking"] == {"chunk_tokens": 32, "overlap": 8}
    code, out, err = rag(capsys, "index", str(docs), "--index", index, "--chunk-tokens", "32", "--overlap", "8",
                         "--no-progress")
    assert code == 0 and "0 embedded, 3 unchanged" in out


def test_query_without_answer(capsys, index):
    code, out, _ = rag(capsys, "query", "When did the Tudor warship sink?", "--index", index, "-k", "2",
                       "--no-answer", "--json")
    assert code == 0
    passages = json.loads(out)["passages"]
    assert len(passages) == 2 and passages[0]["source"] == "ships.txt" and passages[0]["location"].startswith("ships.txt:")
    code, out, _ = rag(capsys, "query", "how do I bake bread", "--index", index, "--no-answer")
    assert code == 0 and out.startswith("[1] notes/bread.txt:") and "answer" not in out


def test_query_answers_with_citations_streamed(capsys, index, smollm_native, monkeypatch):
    monkeypatch.setattr(rag_cli, "_chat_llm", lambda args: smollm_native)  # the session's SmolLM2, loaded once
    code, out, err = rag(capsys, "query", "When did the Mary Rose sink?", "--index", index, "-k", "2",
                         "--max-tokens", "40")
    assert code == 0
    answer = out.split("answer: ", 1)[1]
    assert "cited:" in answer or "the answer cites no passage" in answer
    assert "tokens in" in err
    code, out, _ = rag(capsys, "query", "When did the Mary Rose sink?", "--index", index, "-k", "2", "--rerank",
                       "--rerank-depth", "3", "--max-tokens", "24", "--json")
    result = json.loads(out)
    assert len(result["passages"]) == 2 and all(p["rerank_score"] < 0 for p in result["passages"])
    cited = {c["location"] for c in result["citations"]}
    assert cited <= {p["location"] for p in result["passages"]}


def test_eval(capsys, index, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question": "What do tomatoes need?", "file": "notes/garden.md", "answer": "full sun"},
        {"question": "Why does sourdough rise slowly?", "file": "notes/bread.txt", "answer": "wild yeast"},
    ]))
    code, out, _ = rag(capsys, "eval", "--index", index, "--questions", str(questions))
    assert code == 0 and "recall@1 1.000  recall@5 1.000  MRR@20 1.000" in out
    code, out, _ = rag(capsys, "eval", "--index", index, "--questions", str(questions), "--json")
    report = json.loads(out)
    assert report["questions"] == 2 and report["retrieval"]["ranks"] == [1, 1] and report["rerank"] is None


@pytest.mark.parametrize("argv, message", [
    (["query", "q", "--index", "{tmp}/none"], "no index at"),
    (["eval", "--index", "{tmp}/none"], "no index at"),
    (["index", "{tmp}/no-folder", "--index", "{tmp}/i"], "is not a folder"),
    (["index", "{docs}", "--index", "{tmp}/i", "--chunk-tokens", "10", "--overlap", "10"], "overlap"),
    (["index", "{docs}", "--index", "{docs}"], "not an index"),
    (["eval", "--index", "{index}", "--questions", "{tmp}/none.jsonl"], "named set"),
])
def test_errors_are_one_line(capsys, tmp_path, docs, index, argv, message):
    argv = [a.format(tmp=tmp_path, docs=docs, index=index) for a in argv]
    code, out, err = rag(capsys, *argv)
    assert code == 2 and err.startswith("loom: error: ") and message in err and err.count("\n") == 1


def test_another_embedding_model_is_refused(capsys, index, tmp_path):
    model = default_embedding_model_path()
    other = tmp_path / "other-model"
    other.mkdir()
    for name in os.listdir(model):
        if name != "config.json":
            os.symlink(os.path.join(model, name), other / name)
    with open(os.path.join(model, "config.json")) as f:
        (other / "config.json").write_text(f.read() + "\n")  # the same weights, but not provably the same model
    code, _, err = rag(capsys, "query", "q", "--index", index, "--embedding-model", str(other), "--no-answer")
    assert code == 2 and "was built with the embedding model all-MiniLM-L6-v2" in err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "loom.cli.rag", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "index" in result.stdout and "query" in result.stdout


def test_registered_as_loom_rag(capsys, tmp_path):
    from loom.cli import main

    code = main(["rag", "query", "q", "--index", str(tmp_path / "none")])
    assert code == 2 and "no index at" in capsys.readouterr().err
