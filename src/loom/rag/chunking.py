"""Chunking: cut each text into overlapping windows of the embedding model's tokens.

A chunk is ``chunk_tokens`` tokens of the embedder's own tokenizer (so it never runs past what the
embedder reads), and the next one starts ``overlap`` tokens before it ends, so a short passage (a line,
a sentence under ``overlap`` tokens) always lies whole in at least one chunk: the sliding-window
chunking of most RAG systems (e.g. Lewis et al. 2020 split Wikipedia into 100-word passages; overlap is
the usual remedy for answers cut in two).

Windows end and start only between words (where whitespace or punctuation separates two tokens), never
inside one: a chunk tokenized on its own then gives exactly the tokens it was cut from (WordPiece and
byte-level BPE both pre-split at whitespace and punctuation), so its token count is what the embedder
will see. Each chunk keeps its file, its character span ``[start, end)`` in the file's text (as Python
reads it: UTF-8, universal newlines) and its first and last line (1-based).
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Protocol, Sequence

TEXT_EXTENSIONS = (".txt", ".md")


class TokenSplitter(Protocol):
    """What chunking needs of a tokenizer: each token's character span in ``text`` (no special tokens)."""

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class ChunkingConfig:
    """Tokens per chunk and tokens shared by consecutive chunks (0 <= overlap < chunk_tokens)."""

    chunk_tokens: int = 200
    overlap: int = 40

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.chunk_tokens:
            raise ValueError(f"overlap must be in [0, chunk_tokens={self.chunk_tokens}), got {self.overlap!r}")

    def fitted(self, max_tokens: int) -> ChunkingConfig:
        """This config with chunks of at most ``max_tokens`` (the embedder's limit); the overlap shrinks
        with them, in proportion, if it would no longer fit."""
        if self.chunk_tokens <= max_tokens:
            return self
        overlap = min(self.overlap, (self.overlap * max_tokens) // self.chunk_tokens)
        return ChunkingConfig(max_tokens, overlap)


@dataclass(frozen=True)
class Chunk:
    source: str  # the file, relative to the indexed folder, '/'-separated
    start: int  # character span [start, end) in the file's text
    end: int
    line_start: int  # 1-based, inclusive
    line_end: int
    text: str
    n_tokens: int

    @property
    def location(self) -> str:
        """``file:first-last`` (``file:line`` for a one-line chunk): how answers cite it."""
        lines = str(self.line_start) if self.line_start == self.line_end else f"{self.line_start}-{self.line_end}"
        return f"{self.source}:{lines}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        return cls(str(d["source"]), int(d["start"]), int(d["end"]), int(d["line_start"]), int(d["line_end"]),
                   str(d["text"]), int(d["n_tokens"]))


def _clean_boundaries(text: str, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """``clean[i]``: may a chunk start at token i (and the one before end at i - 1)? Yes at both ends, and
    where the two tokens around the cut are separated by a gap (whitespace) or either side of it is not a
    letter or digit (punctuation: every pre-tokenizer splits there). No inside a word."""
    n = len(spans)
    clean = [True] * (n + 1)
    for i in range(1, n):
        prev_end, start = spans[i - 1][1], spans[i][0]
        if start > prev_end:
            continue
        left, right = text[prev_end - 1: prev_end], text[start: start + 1]
        clean[i] = not (left.isalnum() and right.isalnum())
    return clean


def _windows(clean: Sequence[bool], n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [i, j) of at most ``size`` tokens covering 0..n, cut only at clean boundaries (except
    a single word longer than ``size``), each starting about ``overlap`` tokens before the last ended."""
    windows: list[tuple[int, int]] = []
    i = covered = 0
    while i < n:
        j = min(i + size, n)
        end, floor = j, max(i, covered)
        while end > floor and not clean[end]:
            end -= 1
        if end == floor:  # no word ends past what earlier windows hold (one long word): cut inside it
            end = j
        windows.append((i, end))
        covered = end
        if end == n:
            break
        nxt = end - overlap
        while nxt < end and not clean[nxt]:
            nxt += 1  # forward to the next word start: a little less overlap, never more tokens
        i = nxt if nxt > i else end
    return windows


class LineIndex:
    """Character offset -> 1-based line number, by bisecting the newline offsets."""

    def __init__(self, text: str) -> None:
        self.newlines = [i for i, c in enumerate(text) if c == "\n"]

    def line_of(self, offset: int) -> int:
        return bisect.bisect_left(self.newlines, offset) + 1


def chunk_text(text: str, source: str, splitter: TokenSplitter, config: ChunkingConfig = ChunkingConfig()
               ) -> list[Chunk]:
    """The chunks of one file's ``text`` (none for an empty or blank file)."""
    spans = splitter.token_spans(text)
    if not spans:
        return []
    clean = _clean_boundaries(text, spans)
    lines = LineIndex(text)
    chunks = []
    for i, j in _windows(clean, len(spans), config.chunk_tokens, config.overlap):
        start, end = spans[i][0], spans[j - 1][1]
        chunks.append(Chunk(source, start, end, lines.line_of(start), lines.line_of(max(start, end - 1)),
                            text[start:end], j - i))
    return chunks


def find_documents(folder: str, extensions: Iterable[str] = TEXT_EXTENSIONS,
                   exclude: Iterable[str] = ()) -> list[str]:
    """The text files under ``folder`` (recursively, sorted, hidden files and folders skipped), as
    '/'-separated paths relative to it. ``exclude``: folders not to enter (an index kept inside)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder")
    extensions = tuple(e.lower() for e in extensions)
    skip = {os.path.realpath(e) for e in exclude}
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in skip)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def read_source(path: str) -> tuple[str, str]:
    """A text file's text (UTF-8, undecodable bytes as U+FFFD rather than failing the whole index; newlines
    made \\n as Python's text mode does) and the SHA-256 of its bytes (what re-indexing compares)."""
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return text, hashlib.sha256(data).hexdigest()
