"""Incremental stop strings (KMP automata) against the naive definition, fed in arbitrary pieces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loom.engine.stop_strings import StopStrings, prefix_function
from loom.engine.text_output import TextOutput
from loom.sampling_params import SamplingParams

ALPHABET = "ab,"  # few letters: many overlaps and partial matches
texts = st.text(ALPHABET, max_size=40)
stop_lists = st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4)


def naive_first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The stop occurrence that ends first (the longest of those ending together), by brute force."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return end, max(ending, key=len)
    return None


def naive_held_back(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 40), max_size=8))
def test_matches_the_naive_definition_however_the_text_is_cut(text, stops, cuts):
    matcher, seen = StopStrings(stops), ""
    for piece in pieces_of(text, cuts):
        hit = matcher.feed(piece)
        if hit is not None:
            end, stop = hit
            assert (len(seen) + end, stop) == naive_first_stop(text, stops)
            return
        seen += piece
        assert matcher.held_back == naive_held_back(seen, stops)
    assert naive_first_stop(text, stops) is None


def test_prefix_function():
    assert prefix_function("abababca") == [0, 0, 1, 2, 3, 4, 0, 1]
    assert prefix_function("aaaa") == [0, 1, 2, 3]


class CharTokenizer:
    """Token id = code point: each token is one character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@settings(max_examples=200, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 40), max_size=8), include=st.booleans())
def test_streamed_text_is_never_retracted_and_joins_to_the_cut_text(text, stops, cuts, include):
    out = TextOutput(CharTokenizer(), [], SamplingParams(stop=stops, include_stop_str_in_output=include))
    streamed = ""
    for piece in pieces_of(text, cuts):
        streamed += out.add([ord(c) for c in piece])
        assert out.text.startswith(streamed)
        if out.stopped_by is not None:
            break
    streamed += out.finish()
    hit = naive_first_stop(text, stops)
    want = text if hit is None else text[:hit[0]] if include else text[:hit[0] - len(hit[1])]
    assert streamed == out.text == want
    assert out.stopped_by == (None if hit is None else hit[1])


def test_long_stop_strings_cost_per_character_not_per_stop_length():
    # 16 stop strings of 200,000 characters each: rescanning them per token was ~0.27 s a token
    stops = ["x" * 199_999 + str(i % 10) for i in range(16)]
    out = TextOutput(CharTokenizer(), [], SamplingParams(stop=stops))
    for _ in range(2_000):
        out.add([ord("x")] * 10)
    assert out.stopped_by is None and out.emitted == 0  # all 20,000 characters may still start a stop
    out.add([ord("y")])
    assert out.emitted == 20_001 and out.stopped_by is None
