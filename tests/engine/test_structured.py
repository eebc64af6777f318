"""Constrained decoding on the real model: every output of a suite of 52 JSON schemas parses and validates,
greedy and sampled, batched among unconstrained requests; regex, choice and Lark grammars likewise; what
the backend cannot enforce is refused naming it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loom.errors import InvalidRequestError
from loom.sampling_params import SamplingParams, StructuredOutput
from tests.engine.structured_schemas import SCHEMAS

PROMPT = "Answer with a JSON value that fits the schema {schema}:\n"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_schema_output_validates_batched_with_free_requests(smollm, temperature):
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        prompts.append(PROMPT.format(schema=json.dumps(schema)))
        params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=200,
                                     structured_output=StructuredOutput(json=schema)))
        if i % 8 == 0:  # unconstrained neighbours in the same batches
            prompts.append("Once upon a time")
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=8, ignore_eos=True))
    outs = smollm.generate(prompts, params)
    checked = 0
    for p, out in zip(params, outs):
        o = out.outputs[0]
        if p.structured_output is None:
            assert len(o.token_ids) == 8
            continue
        assert o.finish_reason == "stop", (p.structured_output.json, o.text)
        jsonschema.validate(json.loads(o.text), p.structured_output.json)
        checked += 1
    assert checked == len(SCHEMAS) == 52


def test_constraint_changes_nothing_for_free_neighbours(smollm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = smollm.generate("The capital of France is", free)[0].outputs[0].token_ids
    mixed = smollm.generate(["The capital of France is", "JSON:"], [free, SamplingParams(
        temperature=0, max_tokens=30, structured_output=StructuredOutput(json=SCHEMAS[1]))])
    assert mixed[0].outputs[0].token_ids == alone


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_choice_and_grammar(smollm, temperature):
    specs = [StructuredOutput(regex=r"[0-9]{3}-[0-9]{4}"), StructuredOutput(regex=r"(yes|no), because [a-z ]{1,20}\."),
             StructuredOutput(choice=["red", "green", "blue"]), StructuredOutput(choice=["positive", "negative"]),
             StructuredOutput(grammar='start: "(" NUM " " OP " " NUM ")"\nNUM: /[0-9]{1,3}/\nOP: "+" | "-"')]
    outs = smollm.generate(["A phone number:", "Is the sky blue?", "Pick a color:", "Review: great film! Sentiment:",
                            "An arithmetic expression:"],
                           [SamplingParams(temperature=temperature, seed=3, max_tokens=60, structured_output=s)
                            for s in specs])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[0])
    assert re.fullmatch(r"(yes|no), because [a-z ]{1,20}\.", texts[1])
    assert texts[2] in ("red", "green", "blue") and texts[3] in ("positive", "negative")
    assert re.fullmatch(r"\([0-9]{1,3} [+-] [0-9]{1,3}\)", texts[4])


def test_json_object(smollm):
    # any object: keys and strings are unbounded, so sampling may run past a budget; greedy ends here
    out = smollm.generate("A JSON object describing a cat:", SamplingParams(
        temperature=0, max_tokens=100, structured_output=StructuredOutput(json_object=True)))[0].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


@pytest.mark.parametrize("spec,words", [
    (StructuredOutput(json={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
    (StructuredOutput(json={"not": {"type": "string"}}), '"not"'),
    (StructuredOutput(json={"type": "string", "format": "bogus-format"}), "bogus-format"),
    (StructuredOutput(regex="(unclosed"), "regex"),
    (StructuredOutput(grammar="start: undefined_rule"), "undefined_rule"),
])
def test_what_cannot_be_enforced_is_refused_naming_it(smollm, spec, words):
    with pytest.raises(InvalidRequestError, match=re.escape(words)):
        smollm.generate("x", SamplingParams(max_tokens=4, structured_output=spec))
    assert not smollm.engine.requests


def test_exactly_one_kind():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutput(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutput()


def test_mask_equals_the_matchers_bitmask(smollm):
    import numpy as np
    import torch

    from loom.engine.structured import GrammarBackend

    engine = smollm.engine
    backend = GrammarBackend(smollm.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    matchers = [backend.matcher(StructuredOutput(choice=["red", "green"])),
                backend.matcher(StructuredOutput(regex=r"[0-9]+"))]
    vocab = engine.model.config.vocab_size
    logits = torch.randn(3, vocab)
    before = logits.clone()
    backend.mask(logits, [(0, matchers[0]), (2, matchers[1])])  # row 1 is free
    assert torch.equal(logits[1], before[1])
    for row, m in ((0, matchers[0]), (2, matchers[1])):
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[:vocab]
        allowed = torch.from_numpy(bits.astype(bool))
        assert torch.equal(logits[row][allowed], before[row][allowed])
        assert torch.isinf(logits[row][~allowed]).all() and 0 < int(allowed.sum()) < vocab
    first_red = smollm.tokenizer.encode("red", add_special_tokens=False)[0]
    assert torch.isfinite(logits[0, first_red])


def test_constrained_requests_are_not_speculated(smollm_path):
    from loom import LLM
    from loom.config import SpeculativeConfig

    llm = LLM(smollm_path, speculative=SpeculativeConfig("ngram", 4))
    prompt = "Repeat: [1, 2, 3, 1, 2, 3, 1, 2, 3] -> "
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 9}
    out = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=60, structured_output=StructuredOutput(json=schema)),
        SamplingParams(temperature=0, max_tokens=30)])
    jsonschema.validate(json.loads(out[0].outputs[0].text), schema)
    assert llm.engine.speculator.stats.draft_tokens > 0  # the free neighbour was speculated


def test_a_complete_text_ends_the_request_even_with_ignore_eos_or_min_tokens(smollm):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    for extra in (dict(ignore_eos=True), dict(min_tokens=50)):
        out = smollm.generate("JSON:", SamplingParams(temperature=0, max_tokens=60, **extra,
                                                      structured_output=StructuredOutput(json=schema)))[0].outputs[0]
        assert out.finish_reason == "stop" and json.loads(out.text)["a"] in range(10), (extra, out.text)
        assert len(out.token_ids) < 20


def test_logprobs_of_ruled_out_tokens_are_finite(smollm):
    out = smollm.generate("Pick:", SamplingParams(temperature=0, max_tokens=4, logprobs=5,
                                                  structured_output=StructuredOutput(choice=["yes", "no"])))[0]
    entries = out.outputs[0].logprobs
    assert out.outputs[0].text in ("yes", "no") and entries
    assert all(-9999.0 <= lp.logprob <= 0 for entry in entries for lp in entry.values())
    json.dumps([[lp.logprob for lp in entry.values()] for entry in entries], allow_nan=False)


def test_min_tokens_does_not_fight_the_grammar(smollm):
    # the choice completes after one or two tokens; a min_tokens ban on EOS must not leave nothing allowed
    outs = smollm.generate(["Pick:"] * 4, [SamplingParams(temperature=t, seed=s, max_tokens=8, min_tokens=8,
                                                          structured_output=StructuredOutput(regex="(ab|a)"))
                                           for t, s in ((0, 0), (1.0, 1), (1.0, 2), (1.0, 3))])
    for o in outs:
        assert o.outputs[0].text in ("ab", "a") and o.outputs[0].finish_reason == "stop"
