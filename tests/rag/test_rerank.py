"""UPR reranking: the engine's prompt-logprob scores equal the mean log-probability of the question's tokens
computed naively from full-sequence logits (loom's own forward and HF transformers') on a tiny model."""

from __future__ import annotations

import pytest
import torch

from loom import LLM
from loom.rag.chunking import Chunk
from loom.rag.index import Hit
from loom.rag.rerank import UPRConfig, upr_prompt, upr_rerank, upr_scores, upr_scores_many
from tests.helpers import hf_logits, tiny_llama_gguf

PASSAGES = ["The ship sailed from Venice at dawn with forty men.", "Gardens need water, light and patience.",
            "A king without a crown is still a man.", ""]
QUESTION = "Where did the ship sail from?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upr")
    path = tiny_llama_gguf(folder)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder / "hf"), dtype=torch.float32).eval()
    return LLM(path), hf


def naive_score(logits: torch.Tensor, ids: list[int], start: int) -> float:
    """(1/|q|) sum_t log softmax(logits[t-1])[ids[t]] over the question's positions t >= start."""
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))) / (len(ids) - start))


def test_upr_prompt_puts_the_question_last(tiny):
    llm, _ = tiny
    ids, start = upr_prompt(llm.tokenizer, "Some  passage\ntext.", "Why?")
    text = llm.tokenizer.decode(ids)
    assert text.endswith("Passage: Some passage text. Please write a question based on this passage. Question: Why?")
    assert llm.tokenizer.decode(ids[start:]) == " Why?"
    short, _ = upr_prompt(llm.tokenizer, "x" * 100, "Why?", UPRConfig(max_passage_tokens=10))
    assert len(short) == len(ids) - len("Some passage text.") + 10
    with pytest.raises(ValueError, match="empty"):
        upr_prompt(llm.tokenizer, "passage", "  ")


def test_scores_equal_naive_full_sequence_logits(tiny):
    llm, hf = tiny
    scores = upr_scores(llm, QUESTION, PASSAGES)
    assert len(scores) == len(PASSAGES)
    for passage, score in zip(PASSAGES, scores):
        ids, start = upr_prompt(llm.tokenizer, passage, QUESTION)
        with torch.no_grad():
            own = llm.model.logits(torch.tensor(ids))
        assert score == pytest.approx(naive_score(own, ids, start), abs=1e-4)
        assert score == pytest.approx(naive_score(hf_logits(hf, ids), ids, start), abs=1e-4)
        assert score < 0


def test_many_questions_in_one_batch_equal_one_at_a_time(tiny):
    llm, _ = tiny
    pairs = [(QUESTION, PASSAGES[0]), ("Who wears the crown?", PASSAGES[2]), (QUESTION, PASSAGES[1])]
    together = upr_scores_many(llm, pairs)
    alone = [upr_scores(llm, q, [p])[0] for q, p in pairs]
    assert together == pytest.approx(alone, abs=1e-5)
    assert upr_scores_many(llm, []) == []


def test_rerank_orders_by_score_and_keeps_the_retrievers(tiny):
    llm, _ = tiny
    hits = [Hit(i, Chunk("f.txt", 0, len(p), 1, 1, p, 1), 1.0 - i / 10) for i, p in enumerate(PASSAGES[:3])]
    reranked = upr_rerank(llm, QUESTION, hits)
    scores = upr_scores(llm, QUESTION, PASSAGES[:3])
    assert [h.rerank_score for h in reranked] == sorted(scores, reverse=True)
    assert sorted(h.id for h in reranked) == [0, 1, 2]
    assert all(h.score == 1.0 - h.id / 10 for h in reranked)  # the cosine scores stay with their chunks
