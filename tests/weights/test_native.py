"""The default model's Q4_1 / Q8_0 tensors run natively: same weights, same logits as dequantized fp32."""

from __future__ import annotations

import pytest
import torch

from loom.layers.attention import AttentionMetadata
from loom.layers.quantized import QuantizedLinear
from loom.weights.loader import load_model


@pytest.fixture(scope="module")
def native_and_dense(smollm_native, smollm):
    return smollm_native.model, smollm.model


def test_every_linear_is_repacked_exactly(native_and_dense):
    nat, dense = native_and_dense
    assert isinstance(nat.lm_head, QuantizedLinear) and nat.lm_head.bits == 8  # the tied Q8_0 embedding
    pairs = [(nat.lm_head, dense.embed_tokens.weight)]
    for a, b in zip(nat.layers, dense.layers):
        for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            q = a.get_submodule(name)
            assert isinstance(q, QuantizedLinear) and q.bits == 4 and q.group_size == 32
            pairs.append((q, b.get_submodule(name).weight))
    for q, w in pairs:
        # q d + m vs ggml's d q + m: the same numbers up to one rounding
        assert torch.allclose(q.dequantized_weight(), w, rtol=1e-6, atol=1e-7)


def test_native_logits_equal_dequantized_logits(native_and_dense):
    nat, dense = native_and_dense
    ids = torch.randint(0, nat.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # one row at a time runs the GEMV kernel (more than 32 rows take the dequantize-then-GEMM path)
        for i in (3, 11):
            meta = AttentionMetadata.uncached([i + 1])
            a = nat.compute_logits(nat(ids[: i + 1], meta)[-1:])
            b = dense.compute_logits(dense(ids[: i + 1], meta)[-1:])
            assert (a - b).abs().max() < 1e-3 * b.abs().max()
        full = nat.logits(ids[:12]) - dense.logits(ids[:12])
    assert full.abs().max() < 1e-3


def test_native_generation_matches_dense(smollm_native, smollm):
    from loom import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=24)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    assert isinstance(smollm_native.model.layers[0].mlp.down_proj, QuantizedLinear)  # native is the default
    got = [o.token_ids for o in smollm_native.generate(prompts, p)]
    want = [o.token_ids for o in smollm.generate(prompts, p)]
    assert got == want


def test_unknown_weights_mode(smollm_path):
    with pytest.raises(ValueError, match="unknown weights"):
        load_model(smollm_path, weights="int3")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_tiny_gguf_runs_natively(tmp_path, qtype):
    from tests.helpers import save_tiny_hf, write_llama_gguf

    hf = save_tiny_hf(str(tmp_path / "hf"), "llama", num_key_value_heads=2)
    path = str(tmp_path / "m.gguf")
    write_llama_gguf(path, hf, qtype=qtype)
    nat, dense = load_model(path, weights="native").model, load_model(path, weights="fp32").model
    q = nat.layers[0].attn.qkv_proj
    assert isinstance(q, QuantizedLinear) and q.bits == (8 if qtype == "Q8_0" else 4)
    ids = torch.arange(7)
    with torch.no_grad():
        for n in (1, 7):  # the GEMV kernel row by row, and a short batch
            assert torch.allclose(nat.logits(ids[:n]), dense.logits(ids[:n]), atol=1e-4)


def test_the_tied_embedding_is_looked_up_in_the_output_layers_codes(native_and_dense):
    """One copy of the tied Q8_0 table: the lookup dequantizes its rows from the output layer's buffers (no
    dense [vocab, hidden] parameter), and they equal the dense model's rows (ggml's own dequantization) exactly."""
    from loom.layers.quantized import QuantizedEmbedding

    nat, dense = native_and_dense
    assert isinstance(nat.embed_tokens, QuantizedEmbedding) and nat.embed_tokens.source is nat.lm_head
    assert not any(name.startswith("embed_tokens") for name, _ in nat.named_parameters())
    ids = torch.randint(0, nat.config.vocab_size, (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(nat.token_embeddings(ids), dense.token_embeddings(ids))
    table_bytes = dense.embed_tokens.weight.numel() * 4
    held = sum(t.numel() * t.element_size() for t in list(nat.parameters()) + list(nat.buffers()))
    dense_held = sum(t.numel() * t.element_size() for t in dense.parameters())
    assert held < dense_held - table_bytes  # no dense table beside the quantized weights
