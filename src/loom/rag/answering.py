"""Answers with citations: the retrieved chunks, numbered [1]..[k], in a prompt to the chat model, which is
asked to answer from them and cite them as [n]; the citations in its answer are then read back and mapped
to the chunks' files and lines. A number the answer does not write is never reported as a citation, and
a number outside 1..k is reported as invalid, not mapped (retrieval-augmented generation: Lewis et al.
2020; citing numbered sources: the prompt of WebGPT / ALCE, Gao et al. 2023).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from loom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loom.llm import LLM
    from loom.rag.index import Hit, RagIndex

SYSTEM_PROMPT = ("You answer questions using only the numbered passages the user gives you, and cite the passage "
                 "you used as [n].")
# [3], [1, 2], [1][2], [2-4]: numbers in square brackets, separated by commas, or ranges
CITATION = re.compile(r"\[\s*(\d+(?:\s*(?:[,;–-]|and)\s*\d+)*)\s*\]")


@dataclass(frozen=True)
class AnswerConfig:
    max_tokens: int = 200
    temperature: float = 0.0  # greedy: the same passages give the same answer
    max_passage_chars: int = 1000  # of each chunk, in the prompt (a 200-token chunk is ~900 characters)
    system: str = SYSTEM_PROMPT


@dataclass
class Citation:
    number: int  # as the answer wrote it, 1-based
    hit: Hit

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "location": self.hit.chunk.location, "source": self.hit.chunk.source,
                "line_start": self.hit.chunk.line_start, "line_end": self.hit.chunk.line_end}


@dataclass
class Answer:
    question: str
    text: str
    hits: list[Hit]  # the passages, in the prompt's order: hits[n - 1] is [n]
    citations: list[Citation] = field(default_factory=list)  # in the order the answer first cites them
    invalid: list[int] = field(default_factory=list)  # numbers the answer cites that name no passage
    seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def cited_chunks(self) -> list[Any]:
        return [c.hit.chunk for c in self.citations]

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "citations": [c.to_dict() for c in self.citations],
                "invalid_citations": self.invalid, "passages": [h.to_dict() for h in self.hits],
                "seconds": self.seconds, "generated_tokens": self.generated_tokens}


def passages_block(hits: Sequence[Hit], max_chars: int = AnswerConfig.max_passage_chars) -> str:
    """The passages as the prompt lists them: ``[n]`` then the text, whitespace folded. (Their files and
    lines are left out: a 135M model copies such labels instead of answering.)"""
    return "\n\n".join(f"[{n}] " + " ".join(h.chunk.text.split())[:max_chars] for n, h in enumerate(hits, 1))


def answer_messages(question: str, hits: Sequence[Hit], config: AnswerConfig = AnswerConfig()) -> list[dict[str, str]]:
    user = (f"Passages:\n\n{passages_block(hits, config.max_passage_chars)}\n\nQuestion: {question.strip()}\n"
            # measured on SmolLM2-135M (docs/RESULTS.md): with the example it cites most often; listing the
            # range ("[1] to [k]") it echoes the range, and asked for "the number" it writes it in words
            "Answer in one or two sentences, and cite the passage that supports your answer in square brackets, "
            "like [2].")
    return [{"role": "system", "content": config.system}, {"role": "user", "content": user}]


def parse_citations(text: str, k: int) -> tuple[list[int], list[int]]:
    """(valid, invalid): the distinct numbers cited in ``text`` in first-cited order, split into those that
    name one of the ``k`` passages and those that do not. ``[2-4]`` cites 2, 3 and 4."""
    valid: list[int] = []
    invalid: list[int] = []
    for m in CITATION.finditer(text):
        numbers: list[int] = []
        for part in re.split(r"\s*(?:[,;]|and)\s*", m.group(1)):
            bounds = [int(x) for x in re.split(r"\s*[–-]\s*", part)]
            if len(bounds) == 2 and bounds[0] <= bounds[1] and bounds[1] - bounds[0] < 100:
                numbers += range(bounds[0], bounds[1] + 1)
            else:
                numbers += bounds
        for n in numbers:
            bucket = valid if 1 <= n <= k else invalid
            if n not in bucket:
                bucket.append(n)
    return valid, invalid


def answer(question: str, index: RagIndex | None = None, llm: LLM | None = None, *, hits: Sequence[Hit] | None = None,
           k: int = 5, rerank: bool = False, rerank_depth: int = 20, config: AnswerConfig = AnswerConfig(),
           on_text: Callable[[str], None] | None = None) -> Answer:
    """Retrieve (``k`` chunks from ``index``, or the given ``hits``), optionally rerank the top
    ``rerank_depth`` by UPR, and have ``llm`` (default: ``LLM()``, SmolLM2-135M-Instruct) answer from them
    with citations. ``on_text`` receives the answer's text as it is generated."""
    if llm is None:
        from loom.llm import LLM

        llm = LLM()
    if hits is None:
        if index is None:
            raise ValueError("give an index to search, or the hits to answer from")
        hits = retrieve(index, question, k, llm if rerank else None, rerank_depth)
    hits = list(hits)
    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature)
    pieces, generated = [], 0
    for delta in llm.chat_stream(answer_messages(question, hits, config), params):
        pieces.append(delta.text)
        generated += len(delta.token_ids)
        if on_text is not None and delta.text:
            on_text(delta.text)
    text = "".join(pieces).strip()
    valid, invalid = parse_citations(text, len(hits))
    return Answer(question, text, hits, [Citation(n, hits[n - 1]) for n in valid], invalid,
                  time.perf_counter() - t0, generated)


def retrieve(index: RagIndex, question: str, k: int = 5, rerank_llm: LLM | None = None,
             rerank_depth: int = 20) -> list[Hit]:
    """The top ``k`` chunks for ``question``; with ``rerank_llm``, the top ``max(k, rerank_depth)`` by
    cosine reranked by UPR, then the first ``k``."""
    if rerank_llm is None:
        return index.search(question, k)
    candidates = index.search(question, max(k, rerank_depth))
    return index.rerank(question, candidates, rerank_llm)[:k]
