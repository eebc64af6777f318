"""LLM.embed: the real all-MiniLM-L6-v2 against sentence-transformers, a decoder's pooled states against
Hugging Face, a vector independent of its batch, and the clear refusals (too long, dimensions, generation
with an encoder)."""

from __future__ import annotations

import pytest
import torch

from loom import LLM
from loom.default_model import default_embedding_model_path
from loom.errors import ContextLengthError, InvalidPromptError, InvalidRequestError
from tests.embedding_texts import TEXTS


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(default_embedding_model_path())


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_embedding_model_path(), device="cpu")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_minilm_equals_sentence_transformers(minilm, sentence_transformer):
    assert minilm.is_encoder and minilm.embedder.spec.max_tokens == 256
    ours = minilm.embed(TEXTS)
    theirs = sentence_transformer.encode(TEXTS, convert_to_tensor=True, batch_size=8)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32
    assert float(cosine_distance(ours, theirs).max()) < 1e-5
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))  # Normalize is in its modules.json


def test_minilm_in_bf16_stays_as_close_as_sentence_transformers_own_bf16(sentence_transformer):
    """bf16 on the matrix units (oneDNN-packed linears, LayerNorm on bf16):
    no farther from sentence-transformers' fp32 vectors than sentence-transformers' own bf16 run, within 2x."""
    from sentence_transformers import SentenceTransformer

    from loom.layers.linear import PackedLinear

    bf16 = LLM(default_embedding_model_path(), weights="bf16")
    layer = bf16.embedder.model.layers[0]
    if not isinstance(layer.up_proj, PackedLinear):
        pytest.skip("this torch build has no oneDNN bf16 GEMM")
    reference = sentence_transformer.encode(TEXTS, convert_to_tensor=True, batch_size=8)
    theirs = SentenceTransformer(default_embedding_model_path(), device="cpu",
                                 model_kwargs={"torch_dtype": torch.bfloat16}).encode(TEXTS, convert_to_tensor=True,
                                                                                       batch_size=8)
    ours = bf16.embed(TEXTS)
    assert float(cosine_distance(ours, reference).max()) < 2 * max(float(cosine_distance(theirs, reference).max()),
                                                                   1e-5)


def test_truncation_is_asked_for_and_then_matches_sentence_transformers(minilm, sentence_transformer):
    long = "Embeddings of long documents are cut at the model's maximum length. " * 40  # ~560 tokens
    with pytest.raises(ContextLengthError, match=r"input\[1\] has \d+ tokens; this model embeds at most 256"):
        minilm.embed(["short", long])
    ours = minilm.embed(long, truncate=-1)
    theirs = sentence_transformer.encode([long], convert_to_tensor=True)  # truncates to 256 silently
    assert float(cosine_distance(ours, theirs).max()) < 1e-5
    assert len(minilm.embedder.tokenize([long], truncate=64)[0]) == 64
    with pytest.raises(InvalidRequestError, match="between 1 and the model's maximum of 256"):
        minilm.embed(long, truncate=1000)


def test_batched_equals_alone(minilm):
    batched = minilm.embed(TEXTS, batch_size=7)
    alone = torch.cat([minilm.embed(t) for t in TEXTS])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(minilm.embed(TEXTS, batch_size=1), batched, rtol=0, atol=1e-6)


def test_token_ids_text_and_options(minilm):
    ids = minilm.encode("The cat sits on the mat.")
    assert torch.equal(minilm.embed([ids]), minilm.embed("The cat sits on the mat."))
    assert torch.equal(minilm.embed(ids), minilm.embed([ids]))  # one list of ints is one input
    raw = minilm.embed(TEXTS[:3], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), minilm.embed(TEXTS[:3]))
    cls = minilm.embed(TEXTS[:3], pooling="cls")
    assert not torch.allclose(cls, minilm.embed(TEXTS[:3]))
    with pytest.raises(InvalidRequestError, match="unknown pooling 'max'"):
        minilm.embed("x", pooling="max")
    with pytest.raises(InvalidPromptError, match=r"token ids must be in \[0, 30522\)"):
        minilm.embed([[101, 40000, 102]])
    with pytest.raises(InvalidPromptError, match=r"input\[0\] is empty"):
        minilm.embed([[]])


def test_dimensions_are_refused_for_minilm(minilm):
    with pytest.raises(InvalidRequestError, match="does not support the dimensions parameter") as e:
        minilm.embed("x", dimensions=128)
    assert e.value.param == "dimensions"


def test_matryoshka_where_a_model_declares_it(minilm):
    from dataclasses import replace

    from loom.engine.embedder import Embedder

    embedder = Embedder(minilm.model, minilm.tokenizer, replace(minilm.embedder.spec, matryoshka_dimensions=(64, 128)))
    full = embedder.embed(TEXTS[:4], normalize=False)
    short = embedder.embed(TEXTS[:4], dimensions=64)
    torch.testing.assert_close(short, torch.nn.functional.normalize(full[:, :64], dim=-1))
    with pytest.raises(InvalidRequestError, match="64, 128"):
        embedder.embed(TEXTS[:1], dimensions=100)


def test_an_encoder_cannot_generate(minilm):
    with pytest.raises(InvalidRequestError, match="is an encoder \\(bert\\): it embeds text"):
        minilm.generate("hello")
    with pytest.raises(InvalidRequestError, match="is an encoder"):
        next(minilm.stream("hello"))
    with pytest.raises(InvalidRequestError, match="is an encoder"):
        minilm.chat([{"role": "user", "content": "hi"}])


# Decoders ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A tiny random Llama (a GGUF loom runs, fp32) and the transformers model it was written from."""
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_llama_gguf

    folder = tmp_path_factory.mktemp("decoder")
    path = tiny_llama_gguf(folder)
    return LLM(path, weights="fp32"), LlamaForCausalLM.from_pretrained(str(folder / "hf")).eval()


DECODER_IDS = [[5, 60, 7, 8, 200, 3], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [3]]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_pooling_matches_transformers(tiny_decoder, pooling):
    llm, hf = tiny_decoder
    got = llm.embed(DECODER_IDS, pooling=pooling, normalize=False)
    with torch.no_grad():
        for i, ids in enumerate(DECODER_IDS):
            states = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # after the final norm
            want = states[-1] if pooling == "last" else states.mean(dim=0)
            torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


def test_decoder_defaults_and_batching(tiny_decoder):
    llm, _ = tiny_decoder
    spec = llm.embedder.spec
    assert (spec.pooling.mode, spec.pooling.normalize, spec.dimensions) == ("last", True, 64)
    batched = llm.embed(DECODER_IDS)
    torch.testing.assert_close(batched, torch.nn.functional.normalize(llm.embed(DECODER_IDS, normalize=False)))
    alone = torch.cat([llm.embed([ids]) for ids in DECODER_IDS])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)
    assert llm.embed("some text").shape == (1, 64)
    with pytest.raises(InvalidRequestError, match="does not support the dimensions parameter"):
        llm.embed("x", dimensions=8)
