"""loom's own timed runs, shared by ``loom bench`` and ``loom analyze plot --measure``: the fixed
benchmark text and the greedy runner that times one prompt's prefill and decode.

They live here, below the benchmarks, so that analysis can time loom without importing loom.bench
(bench builds on analysis, never the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from loom.outputs import Timings
from loom.sampling_params import SamplingParams, StructuredOutput
from loom.tokenizer import Tokenizer

if TYPE_CHECKING:
    from loom.llm import LLM

# Fixed benchmark text, so runs are comparable from machine to machine.
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


@dataclass
class LatencySample:
    """One timed run: the prompt's prefill seconds and the decode speed after it."""
    prefill_s: float
    decode_tokens_per_s: float


def loom_runner(llm: LLM, step: str | None = None,
                structured: StructuredOutput | None = None) -> Callable[[list[int], int], LatencySample]:
    """A function timing one greedy run of exactly ``gen_len`` tokens on ``llm`` (EOS banned), its whole
    prompt prefilled each time (the prefix cache is reset), decoding through decode step ``step``
    (engine/step/; None: the engine's own choice). With ``structured``, the text is constrained to it and
    the run ends where the constraint completes (at most ``gen_len`` tokens)."""
    def run(prompt_ids: list[int], gen_len: int) -> LatencySample:
        llm.engine.runner.prefer(step)
        llm.engine.block_manager.reset_prefix_cache()  # each run prefills its whole prompt (no cache hits)
        t = Timings()
        # min_tokens = max_tokens: exactly gen_len tokens, EOS banned (as HF's min_new_tokens does)
        params = SamplingParams(max_tokens=gen_len, min_tokens=gen_len, temperature=0.0, structured_output=structured)
        for _ in llm.stream(prompt_ids, params, t):
            pass
        return LatencySample(t.prefill, t.decode_tokens_per_s)
    return run
