"""Fixed benchmark text, so runs are comparable from machine to machine."""

from __future__ import annotations

from loom.tokenizer import Tokenizer

PASSAGE = (
    "The history of computing is a story of layers. At the bottom, transistors switch on and off; above them, "
    "logic gates combine those switches into arithmetic; above the gates, instruction sets give programmers a "
    "vocabulary; and above the instruction sets, compilers, operating systems and libraries let people think in "
    "terms of files, windows and networks instead of voltages. Each layer hides the one below it, and each new "
    "layer made a new kind of program possible. Language models are the newest layer. They turn text into "
    "numbers, push those numbers through a stack of matrix multiplications, and turn the result back into text. "
    "Serving them well means understanding every layer underneath: how the weights are stored, how the memory "
    "moves, and how many operations each byte has to pay for. "
)


def benchmark_prompt_ids(tokenizer: Tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the passage, repeated as often as needed."""
    ids: list[int] = []
    while len(ids) < n:
        ids.extend(tokenizer.encode(PASSAGE, add_special_tokens=False))
    return ids[:n]
