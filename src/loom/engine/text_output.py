"""Generated token ids -> streamed text, cut at the first stop string.

A stop string may arrive split over several tokens, so text that could still become the start of
a stop string is held back until it cannot. The streamed deltas therefore always join to exactly
the final text (which excludes the stop string unless asked to include it).
"""

from __future__ import annotations

from typing import Sequence

from loom.sampling_params import SamplingParams
from loom.tokenizer import IncrementalDetokenizer, Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        skip = params.skip_special_tokens
        self._detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=skip), prompt_ids)
        self.stops = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self.text = ""  # final text so far (withheld part included)
        self.emitted = 0  # characters of self.text already returned
        self.stopped_by: str | None = None

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _advance(self, delta: str) -> str:
        if not delta:
            return ""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += delta
        if self.stops:
            hits = [(self.text.find(s, search_from), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s) if self.include_stop else i]
                self.stopped_by = s
                return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

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
