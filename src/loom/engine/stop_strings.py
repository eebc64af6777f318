"""Stop strings matched incrementally: Knuth-Morris-Pratt automata, one per stop string.

Text arrives a token's piece at a time. Rescanning the text for every stop string after each token
costs the output's length times the stop strings' length per token; an automaton per stop string
instead keeps, for each, the length of the longest suffix of the text so far that is a prefix of it
(Knuth, Morris & Pratt 1977), so each new character costs amortized O(1) per stop string, whatever
their lengths. That same state is what a streamer must hold back: text that may still become a stop
string.
"""

from __future__ import annotations

from typing import Sequence


def prefix_function(s: str) -> list[int]:
    """``pi[i]``: the length of the longest proper prefix of ``s[:i + 1]`` that is also its suffix."""
    pi = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = pi[k - 1]
        if s[i] == s[k]:
            k += 1
        pi[i] = k
    return pi


class StopStrings:
    """Finds the first stop string completed in text fed piece by piece.

    "First" is by where it ends; of several ending at the same character, the longest. ``held_back``
    is the length of the longest suffix of the text so far that is a proper prefix of a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self._pi = [prefix_function(s) for s in self.stops]
        self._state = [0] * len(self.stops)

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advance over ``text``: ``(end, stop)`` where ``text[:end]`` ends with the first stop string
        completed, or None if none is (the states then cover all of ``text``)."""
        for end, ch in enumerate(text, 1):
            found = None
            for k, s in enumerate(self.stops):
                q, pi = self._state[k], self._pi[k]
                while q and s[q] != ch:
                    q = pi[q - 1]
                if s[q] == ch:
                    q += 1
                if q == len(s):
                    if found is None or len(s) > len(found):
                        found = s
                    q = pi[q - 1]
                self._state[k] = q
            if found is not None:
                return end, found
        return None

    @property
    def held_back(self) -> int:
        return max(self._state, default=0)
