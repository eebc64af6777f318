"""SamplingParams refuses, once and for the API and the server alike, what the engine could not run."""

from __future__ import annotations

import math

import pytest

from loom.errors import InvalidRequestError
from loom.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs,param", [
    (dict(logit_bias={5: math.nan}), "logit_bias"),
    (dict(logit_bias={5: math.inf}), "logit_bias"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(n=2.0), "n"),
    (dict(max_tokens=3.5), "max_tokens"),
    (dict(seed=1 << 64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(stop=[3]), "stop"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_vocabulary_checks():
    p = SamplingParams(logit_bias={10: 1.0}, stop_token_ids=[3])
    p.check_vocabulary(11)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as e:
        p.check_vocabulary(10)
    assert e.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop_token_ids=[50]).check_vocabulary(50)
    assert e.value.param == "stop_token_ids"


def test_engine_refuses_out_of_vocabulary_bias_and_takes_the_largest_seed(smollm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        smollm.generate("hi", SamplingParams(max_tokens=1, logit_bias={10**6: 5.0}))
    out = smollm.generate("hi", SamplingParams(max_tokens=2, n=2, seed=(1 << 64) - 1))[0]  # seed + 1 wraps
    assert [len(o.token_ids) for o in out.outputs] == [2, 2]


def test_good_values_pass_and_seeds_cover_torchs_range():
    SamplingParams(temperature=0, top_k=-1, logit_bias={0: -100, 7: 100.0}, seed=-(1 << 63))
    SamplingParams(seed=(1 << 64) - 1, n=4)
