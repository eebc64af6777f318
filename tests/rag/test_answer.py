"""Answers: the prompt numbers the passages [1]..[k]; the citations the answer writes are parsed and mapped
back to chunks, numbers that name no passage are reported as invalid, and none are ever invented."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from loom.outputs import StreamDelta
from loom.rag.answering import Answer, AnswerConfig, answer, answer_messages, parse_citations
from loom.rag.chunking import Chunk
from loom.rag.index import Hit

HITS = [Hit(i, Chunk(f"doc{i}.txt", 0, 10, 3 * i + 1, 3 * i + 2, f"passage number {i} says {w}", 5), 0.9 - i / 10)
        for i, w in enumerate(["ships sail", "kings rule", "gardens grow"])]


class ScriptedLLM:
    """Stands in for LLM.chat_stream: streams a fixed answer in pieces and records the messages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.messages: list[dict[str, Any]] = []

    def chat_stream(self, messages: list[dict[str, Any]], params: Any = None) -> Iterator[StreamDelta]:
        self.messages = messages
        self.params = params
        pieces = [self.text[i:i + 4] for i in range(0, len(self.text), 4)]
        for n, piece in enumerate(pieces):
            yield StreamDelta(piece, [n], "stop" if n == len(pieces) - 1 else None)


@pytest.mark.parametrize("text, k, valid, invalid", [
    ("Kings rule [2].", 3, [2], []),
    ("Both [1, 3] and again [3][1].", 3, [1, 3], []),
    ("A range [1-3] and [2–3].", 3, [1, 2, 3], []),
    ("See [1 and 2]; also [2; 3].", 3, [1, 2, 3], []),
    ("Out of range [4] and [0] but [2].", 3, [2], [4, 0]),
    ("No citations here. [Exit.] [a] [] [ ] [1.5 m]", 3, [], []),
    ("Nothing at all.", 3, [], []),
    ("[ 2 ]", 1, [], [2]),
])
def test_parse_citations(text, k, valid, invalid):
    assert parse_citations(text, k) == (valid, invalid)


def test_prompt_numbers_the_passages_and_asks_for_citations():
    messages = answer_messages("What grows?", HITS)
    assert messages[0]["role"] == "system" and "[n]" in messages[0]["content"]
    user = messages[1]["content"]
    for n, h in enumerate(HITS, 1):
        assert f"[{n}] {h.chunk.text}" in user
    assert user.index("[1]") < user.index("[2]") < user.index("[3]") < user.index("Question: What grows?")
    assert user.endswith("in square brackets, like [2].")
    long = Hit(9, Chunk("x.txt", 0, 5000, 1, 90, "word " * 1000, 1000), 0.5)
    assert len(answer_messages("q", [long], AnswerConfig(max_passage_chars=100))[1]["content"]) < 400


def test_answer_maps_citations_to_the_retrieved_chunks():
    llm = ScriptedLLM("Gardens grow [3], and kings rule [2]. Also [7].")
    streamed: list[str] = []
    a = answer("What grows?", llm=llm, hits=HITS, on_text=streamed.append)
    assert isinstance(a, Answer) and "".join(streamed) == llm.text == a.text
    assert [c.number for c in a.citations] == [3, 2] and a.invalid == [7]
    assert [c.hit.chunk.location for c in a.citations] == ["doc2.txt:7-8", "doc1.txt:4-5"]
    assert a.cited_chunks == [HITS[2].chunk, HITS[1].chunk]
    assert llm.params.temperature == 0.0 and a.generated_tokens == len(llm.text) // 4 + 1
    d = a.to_dict()
    assert d["citations"][0]["location"] == "doc2.txt:7-8" and len(d["passages"]) == 3


def test_an_answer_without_citations_has_none():
    a = answer("What grows?", llm=ScriptedLLM("I do not know."), hits=HITS)
    assert a.citations == [] and a.invalid == [] and a.cited_chunks == []


def test_answer_needs_an_index_or_hits():
    with pytest.raises(ValueError, match="index"):
        answer("What grows?", llm=ScriptedLLM("x"))
