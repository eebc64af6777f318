"""RagIndex with a fake embedder: save and load, incremental re-indexing, search, and the errors of a
missing, damaged or foreign index."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from loom.rag.chunking import ChunkingConfig
from loom.rag.index import (CHUNKS_FILE, SETTINGS_FILE, VECTORS_FILE, CorruptIndexError, EmbedderMismatchError,
                            IndexNotFoundError, RagIndex, SourceCorpus)
from tests.rag.fakes import FakeEmbedder

CHUNKING = ChunkingConfig(chunk_tokens=24, overlap=6)


def paragraph(topic: str, n: int = 6) -> str:
    return "\n".join(f"The {topic} sentence {i} tells about {topic} matters and {topic} things." for i in range(n))


@pytest.fixture
def folder(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "ships.txt").write_text(paragraph("ship"))
    (docs / "sub" / "gardens.md").write_text(paragraph("garden"))
    (docs / "sub" / "kings.txt").write_text(paragraph("king"))
    (docs / "empty.txt").write_text("")
    (docs / "notes.py").write_text("not indexed")
    return docs


def build(folder, path, embedder=None, chunking=CHUNKING) -> RagIndex:
    return RagIndex.build(str(folder), str(path), embedder or FakeEmbedder(), chunking)


def test_build_save_load_round_trip(folder, tmp_path):
    index = build(folder, tmp_path / "idx")
    assert sorted(os.listdir(tmp_path / "idx")) == sorted([SETTINGS_FILE, VECTORS_FILE, CHUNKS_FILE])
    assert set(index.settings.files) == {"empty.txt", "ships.txt", "sub/gardens.md", "sub/kings.txt"}
    assert index.settings.files["empty.txt"]["chunks"] == 0 and index.stats.files_embedded == 4
    loaded = RagIndex.load(str(tmp_path / "idx"), FakeEmbedder())
    assert loaded.chunks == index.chunks and loaded.settings.chunking == CHUNKING
    assert loaded.vectors.dtype == np.float32 and np.array_equal(loaded.vectors, index.vectors)
    assert np.allclose(np.linalg.norm(loaded.vectors, axis=1), 1)
    settings = json.loads((tmp_path / "idx" / SETTINGS_FILE).read_text())
    assert settings["embedder"]["name"] == "fake-hash" and settings["chunking"] == {"chunk_tokens": 24, "overlap": 6}
    assert len(settings["files"]["ships.txt"]["sha256"]) == 64 and settings["n_chunks"] == len(index)


def test_search_finds_the_topic_and_respects_k(folder, tmp_path):
    index = build(folder, tmp_path / "idx")
    hits = index.search("garden matters", k=3)
    assert [h.chunk.source for h in hits] == ["sub/gardens.md"] * 3
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert len(index.search("ship", k=1000)) == len(index)
    with pytest.raises(ValueError, match="k must"):
        index.search("ship", k=0)
    many = index.search_many(["ship things", "king things"], k=2)
    assert [h.chunk.source for h in many[1]] == ["sub/kings.txt"] * 2


def test_reindex_embeds_only_changed_files_and_equals_a_fresh_build(folder, tmp_path):
    path = tmp_path / "idx"
    build(folder, path)
    (folder / "ships.txt").write_text(paragraph("ship", 9))  # changed
    (folder / "sub" / "kings.txt").unlink()  # removed
    (folder / "new.md").write_text(paragraph("river"))  # added
    fake = FakeEmbedder()
    again = build(folder, path, fake)
    s = again.stats
    assert (s.files_embedded, s.files_reused, s.files_removed, s.rebuilt) == (2, 2, 1, None)
    embedded = {t for call in fake.calls for t in call}
    assert embedded == {c.text for c in again.chunks if c.source in ("ships.txt", "new.md")}
    assert s.chunks_embedded == len(embedded) < len(again)
    fresh = build(folder, tmp_path / "fresh")
    assert again.chunks == fresh.chunks and np.array_equal(again.vectors, fresh.vectors)
    assert RagIndex.load(str(path), FakeEmbedder()).chunks == fresh.chunks
    nothing = build(folder, path, fake2 := FakeEmbedder())
    assert nothing.stats.files_embedded == 0 and fake2.embedded == 0


def test_reindex_with_other_settings_rebuilds(folder, tmp_path):
    path = tmp_path / "idx"
    build(folder, path)
    other = build(folder, path, chunking=ChunkingConfig(30, 5))
    assert "chunking changed" in other.stats.rebuilt and other.stats.files_reused == 0
    model = build(folder, path, FakeEmbedder(name="other-model"), chunking=ChunkingConfig(30, 5))
    assert "embedding model changed" in model.stats.rebuilt


def test_chunks_are_capped_at_the_embedders_length(folder, tmp_path):
    index = build(folder, tmp_path / "idx", FakeEmbedder(max_tokens=16), ChunkingConfig(200, 40))
    assert index.settings.chunking == ChunkingConfig(16, 3) and max(c.n_tokens for c in index.chunks) <= 16


def test_refuses_to_write_into_a_folder_that_is_not_an_index(folder, tmp_path):
    with pytest.raises(ValueError, match="not an index"):
        build(folder, folder)  # the documents folder itself
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build(folder, tmp_path / "file")


def test_empty_folder_gives_an_empty_index(tmp_path):
    (tmp_path / "docs").mkdir()
    index = build(tmp_path / "docs", tmp_path / "idx")
    assert len(index) == 0 and index.search("anything") == []
    assert len(RagIndex.load(str(tmp_path / "idx"), FakeEmbedder())) == 0


def test_source_corpus_of_chosen_files(folder, tmp_path):
    index = RagIndex.build(SourceCorpus(str(folder), ["sub/kings.txt"]), str(tmp_path / "idx"), FakeEmbedder(),
                           CHUNKING)
    assert {c.source for c in index.chunks} == {"sub/kings.txt"}


def test_missing_index_errors(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no such folder.*loom rag index"):
        RagIndex.load(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="no index.json"):
        RagIndex.load(str(tmp_path / "empty"))


def damage_settings(d: dict) -> dict:
    d["files"]["ships.txt"]["chunks"] += 1
    return d


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / SETTINGS_FILE).write_text("{not json"), "not readable JSON"),
    (lambda p: (p / SETTINGS_FILE).write_text('{"format": "something-else"}'), "not a loom RAG index"),
    (lambda p: (p / SETTINGS_FILE).write_text(json.dumps({**json.loads((p / SETTINGS_FILE).read_text()),
                                                          "version": 99})), "version 99"),
    (lambda p: (p / SETTINGS_FILE).write_text(json.dumps({"format": "loom-rag-index", "version": 1})), "garbles"),
    (lambda p: (p / SETTINGS_FILE).write_text(json.dumps(damage_settings(json.loads((p / SETTINGS_FILE).read_text())))),
     "chunks by file"),
    (lambda p: (p / VECTORS_FILE).write_bytes(b"garbage"), "cannot read vectors.npy"),
    (lambda p: (p / VECTORS_FILE).unlink(), "cannot read vectors.npy"),
    (lambda p: np.save(p / VECTORS_FILE, np.load(p / VECTORS_FILE)[:-1]), "vectors"),
    (lambda p: np.save(p / VECTORS_FILE, np.load(p / VECTORS_FILE) * 2), "unit length"),
    (lambda p: np.save(p / VECTORS_FILE, np.load(p / VECTORS_FILE)[:, :10]), "shape"),
    (lambda p: (p / CHUNKS_FILE).write_text("{}\n"), "is not a chunk"),
    (lambda p: (p / CHUNKS_FILE).write_text("\n".join((p / CHUNKS_FILE).read_text().splitlines()[1:]) + "\n"),
     "chunks"),
    (lambda p: (p / CHUNKS_FILE).unlink(), "cannot read .*chunks.jsonl"),
], ids=["json", "format", "version", "settings", "file-counts", "npy-garbage", "npy-missing", "npy-rows", "npy-norms",
        "npy-shape", "chunk-line", "chunk-missing-line", "chunks-missing"])
def test_corrupt_index_errors(folder, tmp_path, damage, message):
    path = tmp_path / "idx"
    build(folder, path)
    damage(path)
    with pytest.raises(CorruptIndexError, match=message):
        RagIndex.load(str(path), FakeEmbedder())
    rebuilt = build(folder, path)  # building over a damaged index starts afresh
    assert rebuilt.stats.files_embedded == 4 and RagIndex.load(str(path), FakeEmbedder())


def test_chunks_swapped_between_files_are_detected(folder, tmp_path):
    path = tmp_path / "idx"
    build(folder, path)
    lines = (path / CHUNKS_FILE).read_text().splitlines()
    (path / CHUNKS_FILE).write_text("\n".join(lines[-1:] + lines[:-1]) + "\n")
    with pytest.raises(CorruptIndexError, match="wrong file"):
        RagIndex.load(str(path), FakeEmbedder())


def test_another_embedding_model_is_refused(folder, tmp_path):
    path = tmp_path / "idx"
    build(folder, path)
    with pytest.raises(EmbedderMismatchError, match="fake-hash.*other"):
        RagIndex.load(str(path), FakeEmbedder(name="other"))
    with pytest.raises(EmbedderMismatchError, match="dimensions"):
        RagIndex.load(str(path), FakeEmbedder(dimension=32))
    index = RagIndex.load(str(path))  # no embedder given: the recorded model's path (None here) is needed
    with pytest.raises(EmbedderMismatchError, match="not there any more"):
        index.search("ship")


def test_an_index_moves_with_its_folder(folder, tmp_path):
    build(folder, tmp_path / "idx")
    shutil.move(str(tmp_path / "idx"), str(tmp_path / "moved"))
    assert RagIndex.load(str(tmp_path / "moved"), FakeEmbedder()).search("king", 1)[0].chunk.source == "sub/kings.txt"


def test_the_full_builds_statistics_survive_updates(folder, tmp_path):
    path = tmp_path / "idx"
    first = build(folder, path)
    build(folder, path)  # nothing changed
    (folder / "ships.txt").write_text(paragraph("ship", 3))
    build(folder, path)  # one file changed
    settings = RagIndex.load(str(path), FakeEmbedder()).settings
    assert settings.build["files_embedded"] == 1
    assert settings.build["full"]["files_embedded"] == 4
    assert settings.build["full"]["chunks_embedded"] == first.stats.chunks_embedded
