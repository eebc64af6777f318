"""The server with speculative decoding on: streamed and whole answers equal plain decoding's, and
/metrics reports acceptance."""

from __future__ import annotations

import httpx
import openai

from loom.bench.text import PASSAGE
from loom.config import SpeculativeConfig
from loom.sampling_params import SamplingParams
from tests.serve.conftest import API_KEY, MODEL, start_server


def test_speculative_server_streams_what_plain_decoding_generates(smollm_native):
    prompt = "Repeat this text: " + PASSAGE[:300] + "\n\nRepeat this text: " + PASSAGE[:120]
    plain = smollm_native.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].text
    live = start_server(speculative=SpeculativeConfig("ngram", 4))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY)
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True))
        assert whole.choices[0].text == streamed == plain
        metrics = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        line = next(l for l in metrics.splitlines() if l.startswith("loom_spec_decode_acceptance_rate{"))
        assert float(line.split()[-1]) > 0.5  # the answer copies the prompt
    finally:
        live.stop()
