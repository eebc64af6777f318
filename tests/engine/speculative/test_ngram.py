"""Prompt lookup proposes the continuation of the latest earlier match of the longest suffix."""

from loom.engine.speculative.ngram import ngram_lookup


def test_continues_the_latest_earlier_occurrence():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 0 and 4 (and is itself at 9): the latest earlier one is at 4 -> 7, 8, 1
    assert ngram_lookup(tokens, 3) == [7, 8, 1]
    assert ngram_lookup(tokens, 1) == [7]


def test_longest_suffix_first_then_shorter():
    tokens = [5, 6, 1, 4, 6, 2, 7, 6]
    # no earlier [2, 7, 6] or [7, 6]; [6] occurs at 1 and 4: the latest is 4 -> 2, 7, 6
    assert ngram_lookup(tokens, 3, max_n=3) == [2, 7, 6]
    assert ngram_lookup(tokens, 3, max_n=3, min_n=2) == []


def test_continuation_may_run_into_the_suffix_and_stops_at_the_end():
    tokens = [3, 3, 3, 3]
    # suffix [3, 3, 3] matches at 0 only; the continuation is the last token
    assert ngram_lookup(tokens, 5) == [3]


def test_nothing_to_propose():
    assert ngram_lookup([], 4) == []
    assert ngram_lookup([7], 4) == []
    assert ngram_lookup([1, 2, 3, 4], 4) == []
    assert ngram_lookup([1, 2, 1], 0) == []
