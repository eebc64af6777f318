"""Generated token ids -> streamed text, cut at the first stop string.

A stop string may arrive split over several tokens, so text that could still become the start of
a stop string is held back until it cannot. The streamed deltas therefore always join to exactly
the final text (which excludes the stop string unless asked to include it).
"""

from __future__ import annotations

from typing import Sequence

from loom.engine.stop_strings import StopStrings
from loom.sampling_params import SamplingParams
from loom.tokenizer import IncrementalDetokenizer, Tokenizer


class TextOutput:
    """The final text of one completion, built from its tokens and cut at its first stop string
    (``engine/stop_strings.py``: matched incrementally, so a token costs the same however long the text
    and the stop strings are)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        skip = params.skip_special_tokens
        self._detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=skip), prompt_ids)
        self._stops = StopStrings(params.stop) if params.stop else None
        self.include_stop = params.include_stop_str_in_output
        self.text = ""  # final text so far (withheld part included)
        self.emitted = 0  # characters of self.text already returned
        self.stopped_by: str | None = None

    def _advance(self, delta: str) -> str:
        if not delta:
            return ""
        if self._stops is None:
            self.text += delta
            return self._emit(len(self.text))
        hit = self._stops.feed(delta)
        if hit is None:
            self.text += delta
            return self._emit(len(self.text) - self._stops.held_back)
        end, stop = hit
        self.text += delta[:end]
        if not self.include_stop:  # its start may lie in text held back before: never in text emitted
            self.text = self.text[: len(self.text) - len(stop)]
        self.stopped_by = stop
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; returns the text that is now final. Check ``stopped_by`` afterwards."""
        return self._advance(self._detok.step(token_ids))

    def finish(self) -> str:
        """End of generation: flush partial characters and anything held back."""
        if self.stopped_by is None:
            self._advance(self._detok.flush())
        return self._emit(len(self.text))


def accept_token(text: TextOutput, token: int, num_output: int, max_tokens: int,
                 stop_ids: set[int] | frozenset[int]) -> tuple[str, str | None, str | int | None]:
    """Account for one sampled token (already counted in ``num_output``): returns the text that became
    final, and the finish and stop reasons if the completion ends here.

    A stop token (EOS, or one of stop_token_ids) ends it without adding text; a stop string ends it
    with the text cut before the string; reaching ``max_tokens`` ends it with reason "length".
    """
    if token in stop_ids:
        return text.finish(), "stop", token
    delta = text.add([token])
    if text.stopped_by is not None:
        return delta, "stop", text.stopped_by
    if num_output >= max_tokens:
        return delta + text.finish(), "length", None
    return delta, None, None
