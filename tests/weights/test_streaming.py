"""Decoder layers streamed from the file equal the layers load_model builds (weights/streaming.py)."""

from __future__ import annotations

import os

import pytest
import torch

from loom.weights.loader import load_model
from loom.weights.streaming import (DIRECT_IO, FADVISE, PAGE, LayerStream, Span, StorageReader, layer_spans,
                                    module_bytes)
from loom.weights.hf import TensorLocation
from tests.helpers import byte_level_vocab_meta, hf_logits, save_tiny_hf, write_llama_gguf

LAYERS = 4
IDS = torch.tensor([1, 5, 9, 3, 7, 2, 200, 17])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    hf = save_tiny_hf(str(root / "hf"), "llama", num_key_value_heads=2, num_hidden_layers=LAYERS)
    paths = {"hf": str(root / "hf")}
    for qtype in ("F32", "Q4_0", "Q8_0"):
        paths[qtype] = str(root / f"tiny-{qtype}.gguf")
        write_llama_gguf(paths[qtype], hf, qtype, tokenizer_meta=byte_level_vocab_meta())
    return hf, paths


def _streamed(path: str, resident: int, buffers: int = 2, **options):
    loaded = load_model(path, decoder_layers=False, **options)
    stream = LayerStream(loaded.model, loaded.layer_sources, buffers=buffers)
    for i in range(resident):
        loaded.model.layers[i] = stream.load(i)
    stream.start(range(resident, LAYERS))
    return loaded.model, stream


@pytest.mark.parametrize("source, options", [("hf", {}), ("hf", {"weights": "bf16"}), ("F32", {}),
                                             ("Q4_0", {"weights": "native"}), ("Q8_0", {"weights": "native"})])
def test_streamed_logits_equal_the_loaded_model(files, source, options):
    hf, paths = files
    reference = load_model(paths[source], **options).model
    want = reference.logits(IDS)
    for resident, buffers in ((0, 2), (1, 3)):
        model, stream = _streamed(paths[source], resident, buffers, **options)
        try:
            for _ in range(3):  # the reader wraps around to the next forward's first layers
                got = model.logits(IDS)
                assert (got - want).abs().max().item() <= 1e-5
                assert torch.equal(got, want)  # the same bytes through the same loader functions: bit for bit
            assert stream.stats.layers_read >= 3 * (LAYERS - resident) + resident
        finally:
            stream.close()
    if source == "hf" and not options:  # and against transformers itself
        assert (want - hf_logits(hf, IDS.tolist())).abs().max().item() < 1e-4


def test_quantized_blocks_stream_as_stored(files):
    """A Q4_0 layer is read as its 4-bit blocks (18 bytes per 32 weights), not as dequantized floats."""
    _, paths = files
    model, stream = _streamed(paths["Q4_0"], 0, weights="native")
    try:
        f32, _ = _streamed(paths["F32"], 0)
        q4_bytes, f32_bytes = stream.builder.file_bytes(1), f32.layers[1]._stream.builder.file_bytes(1)
        f32.layers[1]._stream.close()
        matrices = sum(p.numel() for n, p in load_model(paths["F32"]).model.layers[1].named_parameters()
                       if n.endswith("proj.weight"))
        norms = 2 * model.config.hidden_size * 4
        assert q4_bytes == matrices // 32 * 18 + norms
        assert f32_bytes == matrices * 4 + norms
        before = stream.stats.bytes_read
        model.logits(IDS)
        stream.close()
        per_layer = (stream.stats.bytes_read - before) / max(1, stream.stats.layers_read - 0)
        assert per_layer < q4_bytes + 4 * PAGE  # whole pages around a few reads, no more
    finally:
        stream.close()


def test_resident_memory_of_a_streaming_model_is_what_is_not_streamed(files):
    _, paths = files
    whole = load_model(paths["Q4_0"], weights="native").model
    model, stream = _streamed(paths["Q4_0"], 0, weights="native")
    try:
        layers = sum(module_bytes(layer, besides=whole.rotary) for layer in whole.layers)
        assert module_bytes(model) == module_bytes(whole) - layers
    finally:
        stream.close()


def test_page_cache_modes_read_the_same_bytes(tmp_path):
    data = os.urandom(3 * PAGE + 123)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    import mmap

    for direct in (None, False):
        reader = StorageReader([str(path)], direct=direct)
        try:
            assert reader.mode == (FADVISE if direct is False else reader.mode)
            assert reader.mode in (DIRECT_IO, FADVISE)
            buf = mmap.mmap(-1, 4 * PAGE)
            span = Span(str(path), PAGE + 7, 2 * PAGE + 50, ("x",))
            start = reader.read(span, buf, 0)
            assert bytes(buf[start:start + span.nbytes]) == data[span.offset:span.offset + span.nbytes]
            assert reader.bytes_read >= span.nbytes
        finally:
            reader.close()


def test_neighbouring_tensors_are_read_together():
    locs = {"a": TensorLocation("f", 0, 100), "b": TensorLocation("f", 120, 50), "c": TensorLocation("f", 10**7, 8),
            "d": TensorLocation("g", 0, 4)}
    spans = layer_spans(locs, ["c", "b", "a", "d"])
    assert [(s.path, s.offset, s.nbytes, s.names) for s in spans] == [
        ("f", 0, 170, ("a", "b")), ("f", 10**7, 8, ("c",)), ("g", 0, 4, ("d",))]
    assert spans[1].buffer_bytes == PAGE  # O_DIRECT reads the page around it


def test_a_forward_that_stopped_early_does_not_desynchronize_the_stream(files):
    """A forward that fails inside layer 1 leaves the next layers read ahead for it; the next forwards skip them
    and still get every layer in order, and a layer taken by hand and never given back is dropped."""
    _, paths = files
    want = load_model(paths["F32"]).model.logits(IDS)
    loaded = load_model(paths["F32"], decoder_layers=False)
    model, stream = loaded.model, LayerStream(loaded.model, loaded.layer_sources, buffers=3)
    build, failed = stream.builder.build, []

    def failing_once(i, data):
        layer = build(i, data)
        if i == 1 and not failed:
            failed.append(i)

            def fail(*args):
                del layer.forward  # once: the slot is refilled with the later layers
                raise ValueError("layer 1 failed")

            layer.forward = fail
        return layer

    stream.builder.build = failing_once
    stream.start(range(LAYERS))
    try:
        with pytest.raises(ValueError, match="layer 1 failed"):
            model.logits(IDS)
        assert torch.equal(model.logits(IDS), want)
        stream.acquire(0)  # taken by hand, never released
        assert torch.equal(model.logits(IDS), want)
        assert torch.equal(model.logits(IDS), want)
    finally:
        stream.close()
