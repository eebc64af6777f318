"""Chunking: spans that slice the text back, overlaps of the asked size, line numbers, cuts only between
words, unicode, empty files; the folder walk and how files are read."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.rag.chunking import (Chunk, ChunkingConfig, _windows, chunk_text, find_documents, read_source)
from tests.rag.fakes import FakeEmbedder

WORDS = FakeEmbedder()
TEXT = "\n".join(f"Line {i}: the quick brown fox, number {i}, jumps over the lazy dog." for i in range(1, 41))


class PieceSplitter:
    """Subword tokens: each word cut into pieces of 3 characters (like WordPiece's ##pieces)."""

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for m in re.finditer(r"\w+|[^\w\s]", text):
            spans += [(s, min(s + 3, m.end())) for s in range(m.start(), m.end(), 3)]
        return spans


def check_chunk(text: str, c: Chunk, splitter) -> None:
    assert c.text == text[c.start:c.end] and c.text == c.text.strip()
    assert c.line_start == text.count("\n", 0, c.start) + 1
    assert c.line_end == text.count("\n", 0, c.end - 1) + 1
    assert c.n_tokens == len(splitter.token_spans(c.text))  # re-tokenized alone: the same tokens


def test_spans_sizes_and_exact_overlap():
    config = ChunkingConfig(chunk_tokens=30, overlap=8)
    chunks = chunk_text(TEXT, "a.txt", WORDS, config)
    spans = WORDS.token_spans(TEXT)
    starts = [next(i for i, s in enumerate(spans) if s[0] == c.start) for c in chunks]
    assert len(chunks) > 5 and starts[0] == 0
    for c, first, nxt in zip(chunks, starts, starts[1:] + [len(spans)]):
        check_chunk(TEXT, c, WORDS)
        assert c.source == "a.txt"
        if nxt < len(spans):
            assert c.n_tokens == 30 and first + 30 - nxt == 8  # every boundary between words is clean here
    assert chunks[-1].end == len(TEXT.rstrip())  # the last token is in the last chunk


def test_zero_overlap_tiles_the_tokens():
    chunks = chunk_text(TEXT, "a.txt", WORDS, ChunkingConfig(chunk_tokens=25, overlap=0))
    assert sum(c.n_tokens for c in chunks) == len(WORDS.token_spans(TEXT))
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))


def test_line_numbers_and_location():
    text = "first line\n\nthird line here\nfourth\n"
    (c,) = chunk_text(text, "d/n.md", WORDS, ChunkingConfig(50, 10))
    assert (c.line_start, c.line_end, c.location) == (1, 4, "d/n.md:1-4")
    one = chunk_text("\n\n  lonely words  \n", "x.txt", WORDS)[0]
    assert (one.line_start, one.line_end, one.location, one.text) == (3, 3, "x.txt:3", "lonely words")


def test_never_cuts_inside_a_word():
    splitter = PieceSplitter()
    text = " ".join(["extraordinary", "unquestionably", "a", "b", "incomprehensibilities"] * 30)
    chunks = chunk_text(text, "w.txt", splitter, ChunkingConfig(chunk_tokens=10, overlap=3))
    words = set(text.split())
    for c in chunks:
        check_chunk(text, c, splitter)
        assert c.n_tokens <= 10
        assert set(c.text.split()) <= words  # whole words only
    assert sum(1 for _ in chunks) > 10


def test_a_word_longer_than_the_window_is_cut_and_chunking_ends():
    splitter = PieceSplitter()
    text = "short " + "x" * 90 + " tail"
    chunks = chunk_text(text, "w.txt", splitter, ChunkingConfig(chunk_tokens=8, overlap=2))
    assert all(c.n_tokens <= 8 for c in chunks)
    assert chunks[-1].text.endswith("tail") and chunks[0].text == "short"


def test_unicode_spans_are_character_offsets():
    text = "Ça va? 東京 は 大きい 🎭 naïve café — «quoted» e\u0301t\u00e9\nsecond 🎭 line"
    chunks = chunk_text(text, "u.txt", WORDS, ChunkingConfig(chunk_tokens=4, overlap=1))
    for c in chunks:
        check_chunk(text, c, WORDS)
    assert chunks[-1].line_end == 2 and "🎭" in "".join(c.text for c in chunks)


@pytest.mark.parametrize("text", ["", "   \n\n\t  \n"])
def test_empty_and_blank_files_have_no_chunks(text):
    assert chunk_text(text, "e.txt", WORDS) == []


def test_config_validation_and_fitting():
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkingConfig(0, 0)
    with pytest.raises(ValueError, match="overlap"):
        ChunkingConfig(10, 10)
    with pytest.raises(ValueError, match="overlap"):
        ChunkingConfig(10, -1)
    assert ChunkingConfig(200, 40).fitted(254) == ChunkingConfig(200, 40)
    assert ChunkingConfig(512, 128).fitted(254) == ChunkingConfig(254, 63)


@settings(max_examples=200, deadline=None)
@given(clean=st.lists(st.booleans(), min_size=1, max_size=120), size=st.integers(1, 20), overlap=st.integers(0, 19))
def test_windows_cover_everything_and_advance(clean, size, overlap):
    overlap = min(overlap, size - 1)
    n = len(clean)
    boundaries = [True] + clean[1:] + [True]
    windows = _windows(boundaries, n, size, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == n
    for (i, j), (i2, j2) in zip(windows, windows[1:]):
        assert i < i2 <= j < j2  # each starts and ends later than the one before, with no gap
        assert j - i2 <= overlap
    covered = 0
    for i, j in windows:
        assert 0 < j - i <= size
        # cut at a word boundary, unless no boundary lies past what is covered (inside one long word)
        assert boundaries[j] or not any(boundaries[max(i, covered) + 1:j])
        covered = j


def test_real_tokenizer_chunks_retokenize_to_their_count(embedder):
    text = ("MACBETH.\nIs this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch thee:"
            "\nI have thee not, and yet I see thee still.--Unseam'd him from the nave to the chaps. ") * 12
    chunks = chunk_text(text, "m.txt", embedder, ChunkingConfig(chunk_tokens=40, overlap=10))
    assert len(chunks) > 5
    for c in chunks:
        check_chunk(text, c, embedder)
        assert c.n_tokens <= 40


def test_find_documents(tmp_path):
    for rel in ["b.txt", "a/c.md", "a/d/e.TXT", "a/skip.py", ".hidden.txt", ".git/f.txt", "idx/g.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("words")
    assert find_documents(str(tmp_path), exclude=[str(tmp_path / "idx")]) == ["a/c.md", "a/d/e.TXT", "b.txt"]
    with pytest.raises(FileNotFoundError):
        find_documents(str(tmp_path / "missing"))


def test_read_source_normalizes_newlines_and_hashes_bytes(tmp_path):
    data = b"one\r\ntwo\rthree \xff\n"
    path = tmp_path / "x.txt"
    path.write_bytes(data)
    text, digest = read_source(str(path))
    assert text == "one\ntwo\nthree \ufffd\n" and digest == hashlib.sha256(data).hexdigest()
