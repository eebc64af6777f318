"""Gemma 3 270M served: `loom serve --model gemma-3-270m` formats chats with Gemma's turns (its GGUF carries no
template) and answers what LLM.chat answers, through the openai SDK."""

from __future__ import annotations

import pytest

from loom import SamplingParams
from loom.config import CacheConfig
from loom.llm import LLM
from loom.serve.app import create_app
from tests.serve.conftest import serve_app

MESSAGES = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is snow?"}]


@pytest.mark.slow
def test_gemma_chat_through_the_server_equals_llm_chat():
    import openai

    from loom.default_model import gemma3_270m_path

    try:
        path = gemma3_270m_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    llm = LLM(path, cache=CacheConfig(memory_bytes=64 << 20))
    want = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    live = serve_app(create_app(llm.engine, llm.tokenizer, "gemma-3-270m"))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
        got = client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, temperature=0, max_tokens=12)
    finally:
        live.stop()
    assert got.usage.prompt_tokens == len(llm.tokenizer.encode_chat(MESSAGES))  # Gemma's turns, one BOS
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == want.finish_reason
