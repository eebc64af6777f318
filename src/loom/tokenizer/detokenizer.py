"""Incremental detokenization for streaming.

Decoding one token at a time is wrong in two ways: a character may span several byte-level
tokens (a CJK character or an emoji split in UTF-8 bytes), and decoders that strip or join
spaces depend on the neighbouring tokens. We keep two offsets into the token list (as vLLM
does): ``prefix`` marks a few tokens of already-emitted context, ``read`` the end of what was
emitted. Each step decodes tokens[prefix:read] and tokens[prefix:]; the new text is the
difference, withheld while it ends in U+FFFD (an incomplete UTF-8 sequence).
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int] = (),
                 context: int = 5) -> None:
        self._decode = decode
        # A few prompt tokens give the first generated token its left context (a leading space).
        self.tokens: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self.prefix = 0
        self.read = len(self.tokens)
        self.output_start = self.read
        self.text = ""

    def step(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that became final (possibly empty)."""
        self.tokens.extend(token_ids)
        prefix_text = self._decode(self.tokens[self.prefix:self.read])
        new_text = self._decode(self.tokens[self.prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever is still withheld (even if it ends in U+FFFD)."""
        prefix_text = self._decode(self.tokens[self.prefix:self.read])
        new_text = self._decode(self.tokens[self.prefix:])
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self.prefix = self.read = len(self.tokens)
        self.text += delta
        return delta
