"""UPR: rerank retrieved passages by how well each one predicts the question.

Sachan et al. 2022, "Improving Passage Retrieval with Zero-Shot Question Generation" (UPR): a language
model reads the passage z and an instruction to write a question about it; the passage's relevance to
the question q = (q_1 .. q_|q|) is the mean log-likelihood of q's tokens,

    score(z) = (1 / |q|) * sum_t log p(q_t | prompt(z), q_<t)                       (UPR, eq. 2)

which is log p(q | z) up to a length term shared by every passage of one question. No training; the
reranker only scores, it never generates. Here the LM is loom's chat model, and the scores come from the
engine's prompt logprobs: each (passage, question) text is a prompt with ``prompt_logprobs=0`` and
``max_tokens=1`` (how /v1/completions' echo with max_tokens 0 scores a prompt), all of one question's
passages batched through ``LLM.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from loom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loom.llm import LLM
    from loom.rag.index import Hit
    from loom.tokenizer import Tokenizer

# UPR's instruction (the paper's Section 2.2), with the passage first and the question last
UPR_TEMPLATE = "Passage: {passage} Please write a question based on this passage. Question:"


@dataclass(frozen=True)
class UPRConfig:
    template: str = UPR_TEMPLATE
    max_passage_tokens: int = 512  # the chat model's tokens of one passage (longer ones are cut)


def upr_prompt(tokenizer: Tokenizer, passage: str, question: str, config: UPRConfig = UPRConfig()
               ) -> tuple[list[int], int]:
    """The token ids of ``prompt(passage)`` followed by the question's, and where the question starts.
    The question is tokenized on its own (after a space) so its tokens are the same for every passage."""
    if not question.strip():
        raise ValueError("the question is empty")
    passage_ids = tokenizer.encode(" ".join(passage.split()), add_special_tokens=False)[: config.max_passage_tokens]
    head, tail = config.template.split("{passage}")
    prompt = tokenizer.encode(head) + passage_ids + tokenizer.encode(tail, add_special_tokens=False)
    question_ids = tokenizer.encode(" " + question.strip(), add_special_tokens=False)
    return prompt + question_ids, len(prompt)


def upr_scores(llm: LLM, question: str, passages: Sequence[str], config: UPRConfig = UPRConfig()) -> list[float]:
    """UPR's score of each passage for ``question``: the mean log-probability of the question's tokens."""
    return upr_scores_many(llm, [(question, p) for p in passages], config)


def upr_scores_many(llm: LLM, pairs: Sequence[tuple[str, str]], config: UPRConfig = UPRConfig()) -> list[float]:
    """``upr_scores`` for (question, passage) pairs of any questions, all in one batch."""
    prompts, starts = [], []
    for question, passage in pairs:
        ids, start = upr_prompt(llm.tokenizer, passage, question, config)
        prompts.append(ids)
        starts.append(start)
    if not prompts:
        return []
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    scores = []
    for ids, start, out in zip(prompts, starts, llm.generate(prompts, params)):
        # prompt_logprobs[i] holds log p(ids[i] | ids[:i]); entry 0 is None (nothing predicts it)
        logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))]  # type: ignore[index]
        scores.append(sum(logprobs) / len(logprobs))
    return scores


def upr_rerank(llm: LLM, question: str, hits: Sequence[Hit], config: UPRConfig = UPRConfig()) -> list[Hit]:
    """``hits`` with their UPR scores, best first (ties keep the retriever's order)."""
    scores = upr_scores(llm, question, [h.chunk.text for h in hits], config)
    scored = [replace(h, rerank_score=s) for h, s in zip(hits, scores)]
    return sorted(scored, key=lambda h: -h.rerank_score)  # type: ignore[operator]
