"""RagIndex: chunks of a folder's text files, their unit vectors, exact search, on disk in one folder.

The folder holds three files:

    index.json     the settings: format and version, the embedder (name, path, fingerprint, dimension,
                   max tokens), the chunking (tokens, overlap), each source file's SHA-256 and chunk
                   count, and the last build's statistics
    vectors.npy    float32 [n_chunks, dimension], rows L2-normalized (inner product = cosine)
    chunks.jsonl   one chunk per line, in the rows' order: file, character span, lines, text, tokens

Building again over the same folder with the same embedder and chunking embeds only the files whose
bytes changed (by SHA-256) and drops the chunks of files that are gone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from loom.rag.chunking import Chunk, ChunkingConfig, chunk_text, find_documents, read_source
from loom.rag.embedder import Embedder, EmbedderInfo, LoomEmbedder
from loom.rag.search import VectorSearch

FORMAT = "loom-rag-index"
VERSION = 1
SETTINGS_FILE, VECTORS_FILE, CHUNKS_FILE = "index.json", "vectors.npy", "chunks.jsonl"
NORM_TOLERANCE = 1e-3


class IndexNotFoundError(FileNotFoundError):
    """No index at the given folder."""


class CorruptIndexError(ValueError):
    """An index folder whose files are missing, unreadable or disagree with each other."""


class EmbedderMismatchError(ValueError):
    """The query's embedder is not the model that embedded the index."""


@dataclass
class SourceCorpus:
    """Files to index: '/'-separated paths relative to ``root``."""

    root: str
    files: list[str]

    @classmethod
    def of_folder(cls, folder: str, exclude: Sequence[str] = ()) -> SourceCorpus:
        return cls(os.path.abspath(folder), find_documents(folder, exclude=exclude))


@dataclass
class BuildStats:
    files_embedded: int = 0
    files_reused: int = 0
    files_removed: int = 0
    chunks_embedded: int = 0
    chunks_total: int = 0
    chunk_seconds: float = 0.0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    rebuilt: str | None = None  # why every file was embedded again, if an older index was there


@dataclass
class Hit:
    """One retrieved chunk: its row in the index, its cosine score, and (after reranking) the reranker's."""

    id: int
    chunk: Chunk
    score: float
    rerank_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "location": self.chunk.location, "score": self.score,
                "rerank_score": self.rerank_score, **self.chunk.to_dict()}


@dataclass
class IndexSettings:
    embedder: EmbedderInfo
    chunking: ChunkingConfig
    root: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"sha256", "chunks"}
    build: dict[str, Any] = field(default_factory=dict)  # the last build's BuildStats, and "full": the last full one

    def to_dict(self, n_chunks: int) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "embedder": self.embedder.to_dict(),
                "chunking": asdict(self.chunking), "root": self.root, "n_chunks": n_chunks,
                "files": self.files, "build": self.build}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSettings:
        return cls(EmbedderInfo.from_dict(d["embedder"]), ChunkingConfig(**d["chunking"]), str(d["root"]),
                   dict(d["files"]), dict(d.get("build", {})))


class RagIndex:
    """Chunks and their vectors, searchable by a query's embedding.

    >>> index = RagIndex.build("notes/", "notes.index")       # all-MiniLM-L6-v2, 200-token chunks
    >>> [h.chunk.location for h in index.search("what did we decide about X?", k=5)]
    """

    def __init__(self, path: str, settings: IndexSettings, chunks: list[Chunk], vectors: np.ndarray,
                 embedder: Embedder | None = None, backend: str = "numpy") -> None:
        self.path = path
        self.settings = settings
        self.chunks = chunks
        self.vectors = vectors
        self.searcher = VectorSearch(vectors, backend)
        self._embedder = embedder
        self.stats: BuildStats | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    # Building ----------------------------------------------------------------------------------

    @classmethod
    def build(cls, source: str | SourceCorpus, path: str, embedder: Embedder | None = None,
              chunking: ChunkingConfig | None = None, progress: bool = False) -> RagIndex:
        """Index ``source`` (a folder, read recursively for .txt and .md files, or a SourceCorpus) into the
        folder ``path``, reusing the vectors of unchanged files if ``path`` already holds an index made
        the same way. ``stats`` on the result says what was done."""
        t0 = time.perf_counter()
        if isinstance(source, str):
            source = SourceCorpus.of_folder(source, exclude=[path])
        embedder = embedder or LoomEmbedder()
        info = embedder.info
        chunking = (chunking or ChunkingConfig()).fitted(info.max_tokens)
        old, rebuilt = _reusable(path, info, chunking)
        stats = BuildStats(rebuilt=rebuilt)
        files: dict[str, dict[str, Any]] = {}
        chunks: list[Chunk] = []
        parts: list[np.ndarray | tuple[int, int]] = []  # reused rows of the old index or new chunk ranges
        pending: list[Chunk] = []
        for rel in source.files:
            text, digest = read_source(os.path.join(source.root, *rel.split("/")))
            entry = old.settings.files.get(rel) if old is not None else None
            if entry is not None and entry["sha256"] == digest:
                first = entry["first"]
                rows = np.arange(first, first + entry["chunks"])
                file_chunks = [old.chunks[r] for r in rows]  # type: ignore[union-attr]
                parts.append(old.vectors[rows])  # type: ignore[union-attr]
                stats.files_reused += 1
            else:
                t = time.perf_counter()
                file_chunks = chunk_text(text, rel, embedder, chunking)
                stats.chunk_seconds += time.perf_counter() - t
                parts.append((len(pending), len(pending) + len(file_chunks)))
                pending += file_chunks
                stats.files_embedded += 1
            files[rel] = {"sha256": digest, "chunks": len(file_chunks), "first": len(chunks)}
            chunks += file_chunks
        stats.files_removed = len(set(old.settings.files) - set(files)) if old is not None else 0
        t = time.perf_counter()
        fresh = _embed_all(embedder, [c.text for c in pending], info.dimension, progress)
        stats.embed_seconds = time.perf_counter() - t
        vectors = np.concatenate([p if isinstance(p, np.ndarray) else fresh[p[0]:p[1]] for p in parts]
                                 or [np.zeros((0, info.dimension), np.float32)]).astype(np.float32)
        stats.chunks_embedded, stats.chunks_total = len(pending), len(chunks)
        stats.seconds = time.perf_counter() - t0
        build = asdict(stats)
        # the last build that embedded every file: what indexing this corpus costs (an update may cost nothing)
        build["full"] = dict(build) if old is None else old.settings.build.get("full", {})
        settings = IndexSettings(info, chunking, source.root, files, build)
        index = cls(path, settings, chunks, vectors, embedder)
        index.save()
        index.stats = stats
        return index

    def save(self) -> None:
        """Write the three files (each to a temporary name first, index.json last)."""
        os.makedirs(self.path, exist_ok=True)
        tmp = {name: os.path.join(self.path, f".{name}.tmp") for name in (SETTINGS_FILE, VECTORS_FILE, CHUNKS_FILE)}
        with open(tmp[VECTORS_FILE], "wb") as f:
            np.save(f, np.ascontiguousarray(self.vectors, dtype=np.float32))
        with open(tmp[CHUNKS_FILE], "w", encoding="utf-8") as f:
            for c in self.chunks:
                f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        with open(tmp[SETTINGS_FILE], "w", encoding="utf-8") as f:
            json.dump(self.settings.to_dict(len(self.chunks)), f, indent=1, ensure_ascii=False)
        for name in (VECTORS_FILE, CHUNKS_FILE, SETTINGS_FILE):
            os.replace(tmp[name], os.path.join(self.path, name))

    # Loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, embedder: Embedder | None = None, backend: str = "numpy") -> RagIndex:
        """Read the index at ``path``; IndexNotFoundError if there is none, CorruptIndexError if its files
        are damaged, EmbedderMismatchError if ``embedder`` is not the model that made it. Without an
        embedder, the index's own model (by its recorded path) is loaded when a query first needs it."""
        settings = read_settings(path)
        try:
            vectors = np.load(os.path.join(path, VECTORS_FILE), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CorruptIndexError(f"{path}: cannot read {VECTORS_FILE} ({e}); rebuild the index") from None
        chunks = _read_chunks(path)
        _check_consistent(path, settings, chunks, vectors)
        index = cls(path, settings, chunks, vectors.astype(np.float32, copy=False), None, backend)
        if embedder is not None:
            index.embedder = embedder
        return index

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            recorded = self.settings.embedder
            if not recorded.path or not os.path.exists(recorded.path):
                raise EmbedderMismatchError(
                    f"the index {self.path} was built with {recorded.name} at {recorded.path}, which is not "
                    "there any more: pass that model (--embedding-model PATH) or rebuild the index")
            self.embedder = LoomEmbedder(recorded.path)
        return self._embedder  # type: ignore[return-value]

    @embedder.setter
    def embedder(self, embedder: Embedder) -> None:
        check_embedder(self.settings.embedder, embedder.info, self.path)
        self._embedder = embedder

    # Searching ---------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` chunks most similar to ``query`` (cosine of their embeddings), best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        """``search`` for several queries, embedded in one batch."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = self.embedder.embed(list(queries))
        scores, ids = self.searcher.top_k(q, k)
        return [[Hit(int(i), self.chunks[int(i)], float(s)) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores, ids)]

    def rerank(self, query: str, hits: Sequence[Hit], llm: Any, **options: Any) -> list[Hit]:
        """``hits`` reordered by UPR (loom.rag.rerank): the chat model's log-likelihood of ``query``
        given each chunk."""
        from loom.rag.rerank import upr_rerank

        return upr_rerank(llm, query, hits, **options)


def check_embedder(recorded: EmbedderInfo, given: EmbedderInfo, path: str) -> None:
    if recorded.fingerprint != given.fingerprint or recorded.dimension != given.dimension:
        raise EmbedderMismatchError(
            f"the index {path} was built with the embedding model {recorded.name} ({recorded.path}, "
            f"fingerprint {recorded.fingerprint}, {recorded.dimension} dimensions), but the query would use "
            f"{given.name} ({given.path}, fingerprint {given.fingerprint}, {given.dimension} dimensions): "
            "use the index's model, or rebuild the index with this one")


def read_settings(path: str) -> IndexSettings:
    """The index.json of the index at ``path`` (IndexNotFoundError, CorruptIndexError)."""
    settings_path = os.path.join(path, SETTINGS_FILE)
    if not os.path.isdir(path) or not os.path.isfile(settings_path):
        what = "no such folder" if not os.path.exists(path) else f"no {SETTINGS_FILE} in it"
        raise IndexNotFoundError(f"no index at {path} ({what}): build one with "
                                 f"`loom rag index FOLDER --index {path}`")
    try:
        with open(settings_path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptIndexError(f"{settings_path} is not readable JSON ({e}); rebuild the index") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CorruptIndexError(f"{settings_path} is not a loom RAG index")
    if d.get("version") != VERSION:
        raise CorruptIndexError(f"{settings_path} is version {d.get('version')!r} of the index format; this loom "
                                f"reads version {VERSION}: rebuild the index")
    try:
        return IndexSettings.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptIndexError(f"{settings_path} lacks or garbles a setting ({e!r}); rebuild the index") from None


def _read_chunks(path: str) -> list[Chunk]:
    chunks_path = os.path.join(path, CHUNKS_FILE)
    chunks = []
    try:
        with open(chunks_path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    chunks.append(Chunk.from_dict(json.loads(line)))
                except (KeyError, TypeError, ValueError) as e:
                    raise CorruptIndexError(f"{chunks_path}:{number} is not a chunk ({e!r}); rebuild the index"
                                            ) from None
    except OSError as e:
        raise CorruptIndexError(f"cannot read {chunks_path} ({e}); rebuild the index") from None
    return chunks


def _check_consistent(path: str, settings: IndexSettings, chunks: list[Chunk], vectors: np.ndarray) -> None:
    problems = []
    try:
        n_files = sum(int(f["chunks"]) for f in settings.files.values())
        all(int(f["first"]) >= 0 for f in settings.files.values())
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptIndexError(f"the index at {path} has a garbled file list ({e!r}); rebuild it") from None
    if vectors.ndim != 2 or vectors.shape[1] != settings.embedder.dimension:
        problems.append(f"vectors of shape {vectors.shape}, not [n, {settings.embedder.dimension}]")
    elif not len(chunks) == vectors.shape[0] == n_files:
        problems.append(f"{vectors.shape[0]} vectors, {len(chunks)} chunks, {n_files} chunks by file")
    elif any(c.source != rel for rel, f in settings.files.items()
             for c in chunks[int(f["first"]): int(f["first"]) + int(f["chunks"])]):
        problems.append("chunks listed under the wrong file")
    elif len(vectors) and not np.all(np.abs(np.linalg.norm(vectors, axis=1) - 1) < NORM_TOLERANCE):
        problems.append("vectors that are not unit length (or not finite)")
    if problems:
        raise CorruptIndexError(f"the index at {path} is damaged: {problems[0]}; rebuild it")


def _reusable(path: str, info: EmbedderInfo, chunking: ChunkingConfig) -> tuple[RagIndex | None, str | None]:
    """The index already at ``path`` if its vectors can be reused, and if not, why it is rebuilt. Refuses
    a folder that holds other things than an index (building would write into it)."""
    if not os.path.exists(path):
        return None, None
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not an index folder")
    if not os.path.isfile(os.path.join(path, SETTINGS_FILE)):
        if any(not name.startswith(".") for name in os.listdir(path)):
            raise ValueError(f"{path} is a folder with other files in it, not an index: choose a new folder")
        return None, None
    try:
        old = RagIndex.load(path)
    except CorruptIndexError as e:
        return None, f"the old index was unreadable ({e})"
    if old.settings.embedder.fingerprint != info.fingerprint:
        return None, f"the embedding model changed ({old.settings.embedder.name} -> {info.name})"
    if old.settings.chunking != chunking:
        return None, f"the chunking changed ({asdict(old.settings.chunking)} -> {asdict(chunking)})"
    return old, None


def _embed_all(embedder: Embedder, texts: list[str], dimension: int, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    if not texts:
        return np.zeros((0, dimension), np.float32)
    step = 64
    out = []
    with tqdm(total=len(texts), desc="embed", unit="chunk", disable=not progress) as bar:
        for i in range(0, len(texts), step):
            out.append(np.asarray(embedder.embed(texts[i: i + step]), dtype=np.float32))
            bar.update(len(out[-1]))
    return np.concatenate(out)
