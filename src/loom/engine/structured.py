"""Constrained decoding: each step, the tokens a request's grammar allows, as a mask on its logits.

A constraint (``StructuredOutput``: a JSON schema, any JSON object, a regex, a choice of strings, a Lark
grammar) is compiled once per distinct spec into an llguidance grammar (Microsoft's low-level guidance:
an Earley parser over the lexer's tokens, with the tokenizer's vocabulary walked as a trie, so a mask over
SmolLM2's 49,152 tokens takes ~20 us a step here). Each constrained sequence holds a matcher: before
sampling, its bitmask sets every disallowed logit to -inf (greedy, sampling, penalties and logprobs then
see only allowed tokens); after sampling, the chosen token advances it. EOS is allowed exactly when the
text so far is complete, so a constrained completion ends as a whole JSON value (or match) unless it runs
out of ``max_tokens``.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Sequence

import torch

from loom.errors import InvalidRequestError
from loom.sampling_params import StructuredOutput
from loom.tokenizer import Tokenizer

CACHE_SIZE = 256  # compiled grammars kept (one per distinct constraint)
# JSON as json.dumps writes it: ", " and ": ", no other whitespace (free whitespace lets a model pad forever)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_source(spec: StructuredOutput) -> str:
    """The llguidance grammar text of a constraint (not yet checked)."""
    import llguidance

    if spec.json is not None:
        schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        except ValueError as e:
            raise InvalidRequestError(f"the JSON schema is not a JSON object: {e}", param="json_schema") from None
    if spec.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_LAYOUT)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar or "")


class GrammarBackend:
    """The vocabulary as llguidance sees it, a cache of compiled constraints, and the masking step."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.mask_seconds = 0.0  # time spent masking, and the rows masked (bench latency --structured)
        self.masked_rows = 0

    def compile(self, spec: StructuredOutput) -> str:
        """The checked grammar of ``spec`` (cached); InvalidRequestError naming what the backend cannot
        enforce (an unsupported JSON-schema keyword, a bad regex, a grammar that does not parse)."""
        key = spec.key
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        try:
            grammar = grammar_source(spec)
            failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except ValueError as e:
            failed, messages = True, [str(e)]
        if failed:
            raise InvalidRequestError(f"the structured output cannot be enforced: {messages[0]}",
                                      param="structured_outputs")
        self._grammars[key] = grammar
        if len(self._grammars) > CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutput):  # -> llguidance.LLMatcher
        """A fresh matcher for one sequence."""
        return self._llg.LLMatcher(self.tokenizer, self.compile(spec), log_level=0)

    def mask(self, logits: torch.Tensor, rows: Sequence[tuple[int, object]]) -> None:
        """In place: for each (row, matcher), the logits of the tokens the matcher does not allow now are
        set to -inf (columns past the tokenizer's vocabulary too). The matchers write their bitmasks into
        one [R, ceil(V / 32)] int32 tensor (llguidance drops the GIL meanwhile); one vectorized unpack and
        one masked fill follow."""
        start = time.perf_counter()
        vocab = logits.shape[-1]
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(rows), words, dtype=torch.int32)
        for j, (_, matcher) in enumerate(rows):
            matcher.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), words * 4)  # type: ignore[attr-defined]
        allowed = ((bitmask.unsqueeze(-1) >> self._shifts) & 1).view(len(rows), -1)[:, : min(vocab, words * 32)]
        disallowed = allowed == 0
        if disallowed.shape[-1] < vocab:
            disallowed = torch.nn.functional.pad(disallowed, (0, vocab - disallowed.shape[-1]), value=True)
        index = [i for i, _ in rows]
        if index == list(range(logits.shape[0])):
            logits.masked_fill_(disallowed.to(logits.device), float("-inf"))
        else:
            at = torch.tensor(index, dtype=torch.long, device=logits.device)
            logits[at] = logits[at].masked_fill_(disallowed.to(logits.device), float("-inf"))
        self.mask_seconds += time.perf_counter() - start
        self.masked_rows += len(rows)

    @staticmethod
    def advance(matcher, token: int) -> bool:  # matcher: llguidance.LLMatcher
        """Feed the sampled token to the matcher; False if it refuses it, which happens only when the
        mask allowed nothing the sampler could pick (the sampler then falls back to some token)."""
        return bool(matcher.consume_token(token))
