"""GGUF loading: tiny llama-style files written like llama.cpp's converter, compared with HF on the
same weights; and a clear error, naming file and tensor, for every kind of bad file."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from loom.weights.errors import WeightsError
from loom.weights.gguf import GGUFFile, config_from_gguf
from loom.weights.loader import load_model
from tests.helpers import byte_level_vocab_meta, hf_logits, save_tiny_hf, write_llama_gguf

IDS = [3, 17, 99, 4, 250, 12, 12, 7, 0, 64, 128, 5]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_hf(str(folder), "llama", num_key_value_heads=2)
    return model


@pytest.mark.parametrize("qtype,tol", [("F32", 1e-4), ("F16", None), ("Q8_0", None), ("Q4_1", None), ("Q4_0", None), ("Q5_1", None)])
def test_gguf_logits_match_hf(tmp_path, tiny_llama, qtype, tol):
    """F32/F16 files reproduce HF's logits on the original weights; quantized files match HF run on the
    weights dequantized by the gguf package (the reference dequantizer)."""
    from gguf import GGMLQuantizationType, quants

    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_llama_gguf(path, tiny_llama, qtype, tokenizer_meta=byte_level_vocab_meta())
    loaded = load_model(path)
    assert loaded.format == "gguf" and loaded.config.num_kv_heads == 2
    got = loaded.model.logits(torch.tensor(IDS))
    ref = tiny_llama
    if tol is None:  # rebuild HF's model from what the file holds, dequantized by gguf-py
        import copy

        ref = copy.deepcopy(tiny_llama)
        q = getattr(GGMLQuantizationType, qtype)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if p.dim() == 2:
                    data = quants.quantize(p.detach().numpy().astype(np.float32), q)
                    p.copy_(torch.from_numpy(quants.dequantize(data, q).reshape(p.shape)))
        tol = 1e-4
    assert (got - hf_logits(ref, IDS)).abs().max() < tol


def test_transformers_reads_our_test_files_the_same_way(tmp_path, tiny_llama):
    """Cross-check of the test writer itself: HF's own GGUF loader agrees with HF on the original weights."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(str(path), tiny_llama, "F32", tokenizer_meta=byte_level_vocab_meta())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert (hf_logits(hf, IDS) - hf_logits(tiny_llama, IDS)).abs().max() < 1e-4


def test_qwen2_gguf_with_bias_is_not_permuted(tmp_path):
    folder = tmp_path / "q"
    hf = save_tiny_hf(str(folder), "qwen2", num_key_value_heads=2)
    path = str(tmp_path / "qwen2.gguf")
    write_llama_gguf(path, hf, "F32", tokenizer_meta=byte_level_vocab_meta(), arch="qwen2")
    loaded = load_model(path)
    assert loaded.config.architecture == "qwen2" and loaded.config.qkv_bias
    assert (loaded.model.logits(torch.tensor(IDS)) - hf_logits(hf, IDS)).abs().max() < 1e-4


def test_metadata_and_config(tmp_path, tiny_llama):
    path = str(tmp_path / "m.gguf")
    write_llama_gguf(path, tiny_llama, "F32", tokenizer_meta=byte_level_vocab_meta())
    g = GGUFFile(path)
    assert g.metadata["general.architecture"] == "llama"
    assert g.metadata["tokenizer.ggml.tokens"][:2] == ["Ā", "ā"]
    cfg = config_from_gguf(g)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (2, 64, 4, 2)
    assert cfg.tie_word_embeddings == tiny_llama.config.tie_word_embeddings
    assert g.info("blk.0.attn_k.weight").shape == (32, 64)
    g.close()


# Bad files --------------------------------------------------------------------------------------

@pytest.fixture()
def good_file(tmp_path, tiny_llama) -> str:
    path = str(tmp_path / "good.gguf")
    write_llama_gguf(path, tiny_llama, "F32", tokenizer_meta=byte_level_vocab_meta())
    return path


def test_wrong_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(WeightsError, match=r"x\.gguf.*not a GGUF file"):
        load_model(str(p))


def test_empty_and_missing_files(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_model(str(p))
    with pytest.raises(WeightsError, match="no such file"):
        load_model(str(tmp_path / "nope.gguf"))


def test_unsupported_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<I", 9) + b"\0" * 32)
    with pytest.raises(WeightsError, match="unsupported GGUF version 9"):
        load_model(str(p))


@pytest.mark.parametrize("keep", [10, 200, 0.999])
def test_truncated_file(tmp_path, good_file, keep):
    data = open(good_file, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(WeightsError, match=r"cut\.gguf.*truncated"):
        load_model(str(p))


def test_truncation_names_the_tensor(tmp_path, good_file):
    data = open(good_file, "rb").read()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:-10])
    with pytest.raises(WeightsError) as e:
        load_model(str(p))
    assert e.value.tensor is not None and e.value.tensor in str(e.value)


def test_unsupported_architecture(tmp_path, tiny_llama):
    path = str(tmp_path / "falcon.gguf")
    write_llama_gguf(path, tiny_llama, "F32", arch="falcon")
    with pytest.raises(WeightsError, match="unsupported architecture 'falcon'"):
        load_model(path)


def test_missing_tensor(tmp_path, tiny_llama):
    path = str(tmp_path / "missing.gguf")
    write_llama_gguf(path, tiny_llama, "F32", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(WeightsError, match=r"missing\.gguf \(tensor 'blk\.1\.ffn_up\.weight'\): tensor is missing"):
        load_model(path)


def test_shape_mismatch(tmp_path, tiny_llama):
    import copy

    bad = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 100))
    path = str(tmp_path / "shape.gguf")
    write_llama_gguf(path, bad, "F32")
    with pytest.raises(WeightsError, match=r"blk\.0\.ffn_down\.weight.*shape \(64, 100\) does not match"):
        load_model(path)


def test_unsupported_quantization(tmp_path, tiny_llama):
    """A tensor stored as IQ2_XXS (a type loom does not dequantize) is refused by name."""
    import gguf

    path = str(tmp_path / "iq.gguf")
    # Write a valid file, then rewrite one tensor's type code in place (same block size, 256 elements).
    write_llama_gguf(path, tiny_llama, "F32")
    g = GGUFFile(path)
    info = g.info("blk.0.attn_v.weight")
    g.close()
    raw = bytearray(open(path, "rb").read())
    name = b"blk.0.attn_v.weight"
    at = raw.index(name) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", raw, type_at)[0] == int(info.qtype)
    struct.pack_into("<I", raw, type_at, int(gguf.GGMLQuantizationType.IQ2_XXS))
    open(path, "wb").write(bytes(raw))
    with pytest.raises(WeightsError, match=r"blk\.0\.attn_v\.weight.*unsupported quantization type IQ2_XXS"):
        load_model(path)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_model_matches_transformers_reading_the_same_file(tmp_path, qtype):
    """A whole model stored in a K-quant: loom's logits equal HF's own GGUF loader's on the same file
    (HF dequantizes with gguf-py and un-permutes Q/K itself, so it is an independent reader)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.helpers import random_k_quant

    hf = save_tiny_hf(str(tmp_path / "src"), "llama", hidden_size=256, intermediate_size=512,
                      num_key_value_heads=2, tie_word_embeddings=False)
    rng = np.random.default_rng(7)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    path = tmp_path / "k.gguf"
    write_llama_gguf(str(path), hf, "F32", tokenizer_meta=byte_level_vocab_meta())
    # Rewrite: same header, every 2-D tensor replaced by random blocks of `qtype`.
    g = GGUFFile(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "kq.gguf"), "llama")
    for key, value in g.metadata.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, info in g.tensors.items():
        if len(info.shape) == 2:
            rows, cols = info.shape
            raw = random_k_quant(qtype, rows * cols // 256, rng, scale=2e-3).reshape(rows, -1)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)
        else:
            w.add_tensor(name, g.tensor(name).numpy())
    g.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_model(str(tmp_path / "kq.gguf")).model.logits(torch.tensor(IDS))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="kq.gguf", dtype=torch.float32).eval()
    assert ours.abs().max() > 0.1  # the weights are not degenerate
    assert (ours - hf_logits(ref, IDS)).abs().max() < 1e-3
