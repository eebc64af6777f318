"""LoRA adapters over the OpenAI API (``loom serve --lora-modules``, serve/lora.py): the openai SDK picks an
adapter by ``model`` and gets what the merged model (``LLM(base, lora=dir)``) computes, for several adapters
and the base model at once; /v1/models lists each adapter with its parent; adapters load and unload at run
time (only with ``--allow-runtime-lora``), with clear 4xx answers for what cannot be served; an unload
while a stream runs on the adapter lets it finish, and new requests get a 404; /metrics counts requests
per adapter and shows the adapters in use.

A tiny random Llama with a byte-level tokenizer and PEFT adapters saved by PEFT itself; each request asks
for a few greedy tokens."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loom import LLM, SamplingParams
from loom.config import LoraServingConfig
from loom.serve.app import create_app
from tests.helpers import peft_adapter, save_tiny_hf, tiny_base_with_adapters
from tests.serve.conftest import serve_app

MODEL = "tiny"
KEY = "lora-key"
H = {"Authorization": f"Bearer {KEY}"}
# name -> (target modules, rank): two served from the start, one loaded at run time, one of too high a rank
ADAPTERS = {"a0": ("all-linear", 4), "a1": (["q_proj", "v_proj"], 8), "a2": (["gate_proj", "down_proj", "o_proj"], 2),
            "big": (["q_proj"], 16)}
PROMPTS = [[(7 * k + 3 * j) % 250 + 2 for j in range(5 + 3 * k)] for k in range(6)]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
STREAM_TOKENS = 48
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """The base model's folder, each adapter's, and an adapter for a model of another width ("other")."""
    root = tmp_path_factory.mktemp("lora-server")
    paths = tiny_base_with_adapters(root, ADAPTERS)
    config_path = os.path.join(paths["base"], "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(config | {"chat_template": CHAT_TEMPLATE}, f)
    hf = save_tiny_hf(str(root / "hf-other"), num_key_value_heads=2, hidden_size=32)
    paths["other"] = str(root / "other")
    peft_adapter(hf, paths["other"])
    return paths


@pytest.fixture(scope="module")
def merged(tiny) -> dict[str, list[str]]:
    """Each prompt's greedy text under each adapter merged into the weights (``--lora``), and the base
    model's (under its served name)."""
    out = {name: [o.outputs[0].text for o in LLM(tiny["base"], weights="fp32", lora=tiny[name]).generate(
        PROMPTS, GREEDY)] for name in ("a0", "a1", "a2")}
    out[MODEL] = [o.outputs[0].text for o in LLM(tiny["base"], weights="fp32").generate(PROMPTS, GREEDY)]
    assert len({tuple(texts) for texts in out.values()}) == 4  # every adapter changes what comes out
    out["chat:a1"] = [LLM(tiny["base"], weights="fp32", lora=tiny["a1"]).chat(CHAT, GREEDY)[0].outputs[0].text]
    return out


def serving_llm(tiny) -> LLM:
    """The base model serving a0 and a1 from the start (``--lora-modules a0=DIR a1=DIR --max-loras 2
    --max-lora-rank 8``)."""
    config = LoraServingConfig(max_loras=2, max_lora_rank=8, modules=(("a0", tiny["a0"]), ("a1", tiny["a1"])))
    return LLM(tiny["base"], weights="fp32", lora_serving=config)


@pytest.fixture(scope="module")
def live(tiny):
    llm = serving_llm(tiny)
    s = serve_app(create_app(llm.engine, llm.tokenizer, MODEL, api_key=KEY, model_root=tiny["base"],
                             allow_runtime_lora=True))
    yield s
    s.stop()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(live, route: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + route, json=body, headers=H, timeout=60)


def complete(client: openai.OpenAI, model: str, k: int) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=PROMPTS[k], max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_the_openai_sdk_selects_adapters_by_model_name(live, merged):
    """Twelve requests at once, for two adapters and the base model: each gets its merged model's text and
    names its model; they ran in shared batches (the engine saw several adapters in one step)."""
    aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    names = [[MODEL, "a0", "a1"][k % 3] for k in range(12)]

    async def run() -> list[openai.types.Completion]:
        return await asyncio.gather(*(aclient.completions.create(
            model=name, prompt=PROMPTS[k % 6], max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
            for k, name in enumerate(names)))

    before = dict(live.engine.lora_requests)
    results = asyncio.run(run())
    for k, (name, r) in enumerate(zip(names, results)):
        assert r.model == name
        assert r.choices[0].text == merged[name][k % 6], (k, name)
        assert r.usage.completion_tokens == MAX_TOKENS
    assert {n: live.engine.lora_requests[n] - before.get(n, 0) for n in ("a0", "a1")} == {"a0": 4, "a1": 4}


def test_chat_and_responses_select_adapters_too(client, merged):
    chat = dict(model="a1", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**chat)
    assert r.model == "a1" and r.choices[0].message.content == merged["chat:a1"][0]
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert {c.model for c in chunks} == {"a1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == merged["chat:a1"][0]
    response = client.responses.create(model="a1", input="Say something.", max_output_tokens=MAX_TOKENS)
    assert response.model == "a1"
    with pytest.raises(openai.NotFoundError, match="'a7' does not exist"):
        client.chat.completions.create(**(chat | {"model": "a7"}))


def test_models_lists_the_base_and_each_adapter_with_its_parent(live, client, tiny):
    assert [m.id for m in client.models.list()][:1] == [MODEL]
    cards = {c["id"]: c for c in httpx.get(live.url + "/v1/models", headers=H).json()["data"]}
    assert set(cards) == {MODEL, "a0", "a1"}
    assert cards[MODEL]["parent"] is None and cards[MODEL]["root"] == tiny["base"]
    for name in ("a0", "a1"):
        assert cards[name] | {"created": 0} == {"id": name, "object": "model", "created": 0, "owned_by": "loom",
                                                "max_model_len": cards[MODEL]["max_model_len"],
                                                "root": tiny[name], "parent": MODEL}
    card = client.models.retrieve("a1")
    assert card.id == "a1" and card.parent == MODEL and card.root == tiny["a1"]
    with pytest.raises(openai.NotFoundError, match="'a0', 'a1'"):
        client.models.retrieve("a9")


def test_load_at_run_time_use_then_unload(live, client, merged, tiny):
    r = post(live, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": tiny["a2"]})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a2' added successfully."
    try:
        assert "a2" in [m.id for m in client.models.list()]
        got = complete(client, "a2", 3)
        assert got.model == "a2" and got.choices[0].text == merged["a2"][3]
    finally:
        r = post(live, "/v1/unload_lora_adapter", {"lora_name": "a2"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a2' removed successfully."
    assert "a2" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "a2", 3)
    assert e.value.code == "model_not_found" and "'a2' does not exist" in e.value.message
    r = post(live, "/v1/unload_lora_adapter", {"lora_name": "a2"})
    assert r.status_code == 404 and "'a2' cannot be found" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_name"


@pytest.mark.parametrize("body, status, message", [
    ({"lora_name": "a0", "lora_path": "a1"}, 400, "'a0' is already loaded"),
    ({"lora_name": "big", "lora_path": "big"}, 400, r"rank 16 .* above --max-lora-rank 8"),
    ({"lora_name": "other", "lora_path": "other"}, 400, "another model"),
    ({"lora_name": "gone", "lora_path": "/nonexistent/adapter"}, 404, "no adapter folder at '/nonexistent/adapter'"),
    ({"lora_name": "empty", "lora_path": "."}, 400, "adapter_config.json"),
    ({"lora_name": MODEL, "lora_path": "a1"}, 400, "name of a model this server serves"),
    ({"lora_name": "a9"}, 400, "lora_path"),
    ({"lora_path": "a1"}, 400, "lora_name"),
])
def test_adapters_that_cannot_be_served_are_refused_clearly(live, tiny, tmp_path, body, status, message):
    import re

    body = {k: (tiny.get(v, str(tmp_path) if v == "." else v) if k == "lora_path" else v) for k, v in body.items()}
    r = post(live, "/v1/load_lora_adapter", body)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]["message"]), r.json()
    assert sorted(a.name for a in live.engine.list_loras()) == ["a0", "a1"]  # nothing half-added


def test_the_runtime_routes_need_the_key(live, tiny):
    r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": tiny["a2"]})
    assert r.status_code == 401
    assert httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "a0"}).status_code == 401
    paths = httpx.get(live.url + "/openapi.json", headers=H).json()["paths"]
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(paths)


def test_without_allow_runtime_lora_the_routes_do_not_exist(tiny):
    """As vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING: 404, as for any unknown route; the adapters given
    at start are served all the same."""
    from fastapi.testclient import TestClient

    llm = serving_llm(tiny)
    with TestClient(create_app(llm.engine, llm.tokenizer, MODEL)) as c:
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            r = c.post(route, json={"lora_name": "a2", "lora_path": tiny["a2"]})
            assert r.status_code == 404 and r.json()["error"]["message"] == f"no route POST {route}"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL, "a0", "a1"]
        r = c.post("/v1/completions", json={"model": "a1", "prompt": PROMPTS[0], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "a1"
    plain = LLM(tiny["base"], weights="fp32")
    with pytest.raises(ValueError, match="needs an engine that serves them"):
        create_app(plain.engine, plain.tokenizer, MODEL, allow_runtime_lora=True)
    with pytest.raises(ValueError, match="may not take the name of a served model"):
        create_app(llm.engine, llm.tokenizer, "a0")
    with TestClient(create_app(plain.engine, plain.tokenizer, MODEL)) as c:
        r = c.post("/v1/completions", json={"model": "a0", "prompt": PROMPTS[0], "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def metrics(live) -> dict[str, list]:
    text = httpx.get(live.url + "/metrics", headers=H).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_unloading_while_a_stream_runs_on_the_adapter(live, client, tiny, tiny_stream_reference, monkeypatch):
    """A streamed request on a0 is running (steps slowed to 20 ms, so it runs a while); a0 is unloaded: the
    stream still ends with all its tokens, what the merged model computes, while a new request for a0 gets
    404 at once; /metrics showed a0 running, then nothing."""
    engine = live.engine
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    try:
        stream = client.completions.create(model="a0", prompt=PROMPTS[4], max_tokens=STREAM_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        assert first.model == "a0"
        running = metrics(live)["loom_lora_requests_info"][0].labels
        assert running["running_lora_adapters"] == "a0" and running["max_lora"] == "2"
        assert post(live, "/v1/unload_lora_adapter", {"lora_name": "a0"}).status_code == 200
        assert live.app.state.loom.async_engine.adapter_activity.running == ("a0",)  # still in flight
        with pytest.raises(openai.NotFoundError, match="'a0' does not exist"):
            complete(client, "a0", 0)
        rest = list(chunks)
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert rest[-1].usage.completion_tokens == STREAM_TOKENS
        assert text == tiny_stream_reference
    finally:
        monkeypatch.undo()
        if "a0" not in [a.name for a in engine.list_loras()]:
            assert post(live, "/v1/load_lora_adapter", {"lora_name": "a0", "lora_path": tiny["a0"]}).status_code == 200
    samples = metrics(live)
    assert samples["loom_lora_requests_info"][0].labels["running_lora_adapters"] == ""
    assert samples["loom_lora_active_adapters"][0].value == 0 and engine.adapters.active == []


@pytest.fixture(scope="module")
def tiny_stream_reference(tiny) -> str:
    params = SamplingParams(temperature=0, max_tokens=STREAM_TOKENS, ignore_eos=True)
    return LLM(tiny["base"], weights="fp32", lora=tiny["a0"]).generate([PROMPTS[4]], params)[0].outputs[0].text


def test_metrics_count_requests_per_adapter(live, client):
    def counts() -> dict[str, float]:
        return {s.labels["lora_name"]: s.value for s in metrics(live)["loom_lora_requests"]
                if s.name == "loom_lora_requests_total"}

    before = counts()
    complete(client, "a1", 0)
    complete(client, "a1", 1)
    complete(client, MODEL, 2)
    after = counts()
    assert after["a1"] - before.get("a1", 0) == 2 and after.get("a0") == before.get("a0")
    assert after["a0"] >= 0  # every loaded adapter has a count, 0 before its first request
    received = {name: float(n) for name, n in live.engine.lora_requests.items()}
    assert {name: n for name, n in after.items() if n} == received
    samples = metrics(live)
    assert samples["loom_lora_loaded_adapters"][0].value == 2
    assert samples["loom_lora_requests_info"][0].labels["model_name"] == MODEL


def test_loom_serve_with_lora_modules(tiny, merged):
    """The command line end to end: ``loom serve --lora-modules a0=DIR --allow-runtime-lora`` serves a0 beside
    the base model, lists both, loads a1 at run time, and prints the adapters it serves."""
    from tests.serve.conftest import MODEL as CLI_MODEL, start_cli_server

    proc, url = start_cli_server("--model", tiny["base"], "--weights", "fp32", "--kv-cache-memory", "16MiB",
                                 "--lora-modules", f"a0={tiny['a0']}", "--max-lora-rank", "8", "--allow-runtime-lora",
                                 "--log-level", "warning")
    try:
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [(c["id"], c["parent"], c["root"]) for c in cards] == [(CLI_MODEL, None, tiny["base"]),
                                                                      ("a0", CLI_MODEL, tiny["a0"])]
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": tiny["a1"]})
        assert r.status_code == 200
        for name in ("a0", "a1", CLI_MODEL):
            r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60).json()
            assert r["model"] == name and r["choices"][0]["text"] == merged[name if name != CLI_MODEL else MODEL][2]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "LoRA adapters 'a0'; runtime LoRA loading on" in out
