"""The embedding routes: /v1/embeddings (floats and base64 equal to LLM.embed's vectors), rerank and score
(cosine similarities, ordered), /v1/models, clear 400s / 404s, the work off the event loop, and one real
`loom serve --embedding-model` process driven by the openai SDK."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from loom import LLM
from loom.default_model import default_embedding_model_path
from loom.serve.app import create_app
from tests.embedding_texts import TEXTS
from tests.helpers import tiny_llama_gguf
from tests.serve.conftest import API_KEY, MODEL, start_cli_server

H = {"Authorization": f"Bearer {API_KEY}"}
EMBEDDER = "minilm"


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(default_embedding_model_path())


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> LLM:
    """A tiny random decoder as the chat model (cheap to start)."""
    return LLM(tiny_llama_gguf(tmp_path_factory.mktemp("chat")), weights="fp32")


@pytest.fixture(scope="module")
def client(chat, minilm):
    app = create_app(chat.engine, chat.tokenizer, "tiny", api_key=API_KEY, embedder=minilm.embedder,
                     embedding_model_name=EMBEDDER, max_embedding_inputs=40)
    with TestClient(app, headers=H) as c:
        yield c


def post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error(client, path: str, body: dict, status: int = 400) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_float_and_base64_vectors_equal_llm_embed(client, minilm):
    want = minilm.embed(TEXTS)
    floats = post(client, "/v1/embeddings", {"model": EMBEDDER, "input": TEXTS})
    assert floats["object"] == "list" and floats["model"] == EMBEDDER
    assert [d["index"] for d in floats["data"]] == list(range(len(TEXTS)))
    assert all(d["object"] == "embedding" for d in floats["data"])
    assert torch.equal(torch.tensor([d["embedding"] for d in floats["data"]], dtype=torch.float32), want)
    tokens = sum(len(ids) for ids in minilm.embedder.tokenize(TEXTS))
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    b64 = post(client, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    assert np.array_equal(decoded, want.numpy())


def test_input_shapes(client, minilm):
    one = post(client, "/v1/embeddings", {"input": "The cat sits on the mat."})["data"]
    ids = minilm.encode("The cat sits on the mat.")
    assert post(client, "/v1/embeddings", {"input": ids})["data"] == one
    two = post(client, "/v1/embeddings", {"input": [ids, ids[:3]]})["data"]
    assert torch.equal(torch.tensor([d["embedding"] for d in two]), minilm.embed([ids, ids[:3]]))
    assert two[0]["embedding"] == pytest.approx(one[0]["embedding"], abs=1e-6)  # its batch does not matter
    long = "word " * 300
    cut = post(client, "/v1/embeddings", {"input": long, "truncate_prompt_tokens": -1})
    assert cut["usage"]["prompt_tokens"] == 256
    assert torch.equal(torch.tensor([cut["data"][0]["embedding"]]), minilm.embed(long, truncate=-1))
    raw = post(client, "/v1/embeddings", {"input": "x", "normalize": False})["data"][0]["embedding"]
    assert abs(float(np.linalg.norm(raw)) - 1) > 1e-3


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", "empty string"),
    ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"input": []}, "input", "input must not be empty"),
    ({"input": [[]]}, "input", "input[0] is empty"),
    ({"input": "word " * 300}, "input", "input[0] has 302 tokens; this model embeds at most 256"),
    ({"input": [[101, 99999, 102]]}, "input", "input[0]: token ids must be in [0, 30522)"),
    ({"input": [[101, -1, 102]]}, "input", "token ids must be in [0, 30522)"),
    ({"input": "x", "dimensions": 64}, "dimensions", "does not support the dimensions parameter"),
    ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": ["x"] * 41}, "input", "at most 40 inputs per request, got 41"),
    ({"input": [1, "a"]}, "input", "input: Value error, must be a string, a list of strings, a list of token ids"),
    ({"input": ["a", [1]]}, "input", "must be a string, a list of strings"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "between 1 and the model's maximum"),
])
def test_bad_embedding_requests_get_a_clear_400(client, body, param, words):
    e = error(client, "/v1/embeddings", body)
    assert e["type"] == "invalid_request_error" and words in e["message"]
    assert e["param"] == param or (e["param"] or "").startswith(param)


def test_other_models_are_404_and_models_lists_both(client):
    e = error(client, "/v1/embeddings", {"input": "x", "model": "tiny"}, 404)
    assert e["code"] == "model_not_found" and "'minilm'" in e["message"]
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", EMBEDDER]
    card = client.get(f"/v1/models/{EMBEDDER}").json()
    assert card["id"] == EMBEDDER and card["max_model_len"] == 256
    assert client.get("/v1/models/nope").status_code == 404


DOCS = ["Stock markets fell sharply on Tuesday.", "A small cat sleeps on the sofa.", "Dogs and cats are popular pets.",
        "The recipe needs two eggs and flour."]


def cosine(minilm, query: str, docs: list[str]) -> list[float]:
    v = minilm.embed([query] + docs)
    return (v[1:] @ v[0]).tolist()


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_orders_documents_by_cosine_similarity(client, minilm, path):
    out = post(client, path, {"model": EMBEDDER, "query": "pets at home", "documents": DOCS[:2] + [{"text": DOCS[2]},
                                                                                               DOCS[3]]})
    assert out["model"] == EMBEDDER and out["id"].startswith("rerank-")
    scores = [r["relevance_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    want = cosine(minilm, "pets at home", DOCS)
    assert [r["index"] for r in out["results"]] == sorted(range(4), key=lambda i: -want[i])
    for r in out["results"]:
        assert r["relevance_score"] == pytest.approx(want[r["index"]], abs=1e-6)
        assert r["document"] == {"text": DOCS[r["index"]]}
    assert out["results"][0]["index"] in (1, 2)  # about pets, not stocks or eggs
    top = post(client, path, {"query": "pets at home", "documents": DOCS, "top_n": 2, "return_documents": False})
    assert [r["index"] for r in top["results"]] == [r["index"] for r in out["results"][:2]]
    assert all("document" not in r for r in top["results"])


def test_score_pairs_texts(client, minilm):
    out = post(client, "/v1/score", {"model": EMBEDDER, "text_1": "pets at home", "text_2": DOCS})
    assert out["object"] == "list" and out["id"].startswith("score-") and out["model"] == EMBEDDER
    assert [d["index"] for d in out["data"]] == [0, 1, 2, 3] and all(d["object"] == "score" for d in out["data"])
    assert [d["score"] for d in out["data"]] == pytest.approx(cosine(minilm, "pets at home", DOCS), abs=1e-6)
    pairwise = post(client, "/v1/score", {"text_1": DOCS[:2], "text_2": DOCS[2:]})["data"]
    v = minilm.embed(DOCS)
    assert [d["score"] for d in pairwise] == pytest.approx([float(v[0] @ v[2]), float(v[1] @ v[3])], abs=1e-6)


@pytest.mark.parametrize("path, body, words", [
    ("/v1/rerank", {"query": "q", "documents": []}, "documents must not be empty"),
    ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, "must be a list of strings or of {\"text\": ...}"),
    ("/v1/score", {"text_1": 5, "text_2": ["a"]}, "text_1: Value error, must be a string or a list of strings"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query[0] is an empty string"),
    ("/v1/rerank", {"query": "q", "documents": ["a", ""]}, "documents[1] is an empty string"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "greater than or equal to 1"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 40}, "at most 40 inputs per request"),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1 has 2 texts and text_2 3"),
    ("/v1/score", {"text_1": [], "text_2": ["a"]}, "must not be empty"),
    ("/v1/score", {"text_1": "q", "text_2": ["a", "word " * 300]}, "text_2[1] has 302 tokens"),
    ("/v1/rerank", {"query": "q", "documents": [[1, 2]]}, "must be a list of strings"),
])
def test_bad_rerank_and_score_requests(client, path, body, words):
    assert words in error(client, path, body)["message"]


def test_the_forward_pass_runs_off_the_event_loop(client, minilm, monkeypatch):
    threads = []
    real = minilm.embedder.embed_ids

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(minilm.embedder, "embed_ids", spy)
    post(client, "/v1/embeddings", {"input": "x"})
    post(client, "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert len(threads) == 2 and all(name.startswith("loom-embed") for name in threads)


def test_without_an_embedding_model_the_chat_model_embeds(chat):
    app = create_app(chat.engine, chat.tokenizer, "tiny")
    with TestClient(app) as c:
        out = post(c, "/v1/embeddings", {"model": "tiny", "input": [[1, 5, 6, 7], [1, 8]]})
        assert out["model"] == "tiny"
        got = torch.tensor([d["embedding"] for d in out["data"]], dtype=torch.float32)
        assert torch.equal(got, chat.embed([[1, 5, 6, 7], [1, 8]]))
        text = post(c, "/v1/embeddings", {"input": "hello"})["data"][0]["embedding"]
        assert torch.equal(torch.tensor([text]), chat.embed("hello"))
        assert [card["id"] for card in c.get("/v1/models").json()["data"]] == ["tiny"]
        assert post(c, "/v1/score", {"text_1": "a", "text_2": ["a"]})["data"][0]["score"] == pytest.approx(1.0)


def test_a_real_server_and_the_openai_sdk(minilm):
    import openai

    proc, url = start_cli_server("--kv-cache-memory", "64MiB", "--api-key", API_KEY, "--embedding-model",
                                 "--log-level", "warning")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        want = minilm.embed(TEXTS)
        default = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)  # the SDK asks for base64
        assert torch.equal(torch.tensor([d.embedding for d in default.data], dtype=torch.float32), want)
        floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:3], encoding_format="float")
        assert torch.equal(torch.tensor([d.embedding for d in floats.data], dtype=torch.float32),
                           minilm.embed(TEXTS[:3]))
        assert floats.usage.prompt_tokens == sum(len(x) for x in minilm.embedder.tokenize(TEXTS[:3]))
        assert {m.id for m in client.models.list().data} == {MODEL, "all-MiniLM-L6-v2"}
        with pytest.raises(openai.BadRequestError, match="empty string"):
            client.embeddings.create(model="all-MiniLM-L6-v2", input="")
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model=MODEL, input="x")
    finally:
        proc.terminate()
        proc.wait(30)
