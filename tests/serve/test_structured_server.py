"""Structured outputs over HTTP: the openai SDK's ``parse`` with a pydantic model, ``response_format``
json_object, vLLM's ``structured_outputs`` / ``guided_*`` extras, and a 400 naming what cannot be enforced."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import MODEL


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=50_000_000)


def test_openai_sdk_parse_with_a_pydantic_model(client):
    done = client.chat.completions.parse(model=MODEL, temperature=0, max_tokens=80, response_format=City,
                                         messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = done.choices[0].message.parsed
    assert isinstance(city, City) and done.choices[0].finish_reason == "stop"


def test_json_object_and_vllm_extras(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80,
                                       response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "A cat as JSON."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="Pick a color:", max_tokens=5, temperature=1.0,
                                  extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert r.choices[0].text in ("red", "green", "blue")
    r = client.completions.create(model=MODEL, prompt="A year:", max_tokens=8, temperature=1.0,
                                  extra_body={"guided_regex": "(19|20)[0-9]{2}"})
    assert len(r.choices[0].text) == 4 and r.choices[0].text[:2] in ("19", "20")
    chunks = client.completions.create(model=MODEL, prompt="A year:", max_tokens=8, temperature=0, stream=True,
                                       extra_body={"guided_choice": ["1999", "2024"]})
    assert "".join(c.choices[0].text for c in chunks) in ("1999", "2024")


@pytest.mark.parametrize("extra,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"extra_body": {"guided_regex": "(", "guided_choice": ["a"]}}, "one structured output"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
])
def test_what_cannot_be_enforced_is_400(client, extra, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}], **extra)
    assert words in e.value.body["message"]
