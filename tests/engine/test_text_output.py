"""Stop strings: found across token boundaries, cut out of the text, never streamed then retracted."""

from __future__ import annotations

import pytest

from loom.engine.text_output import TextOutput
from loom.sampling_params import SamplingParams
from loom.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm_path):
    return load_tokenizer(smollm_path)


def run(tok, text, **kw):
    params = SamplingParams(**kw)
    out = TextOutput(tok, [], params)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = []
    for t in ids:
        pieces.append(out.add([t]))
        if out.stopped_by is not None:
            break
    pieces.append(out.finish())
    return pieces, out


@pytest.mark.parametrize("stop,want", [(["world"], "hello "), (["lo wo"], "hel"), (["xyz"], "hello world, again"),
                                       (["again", ", "], "hello world"), (["d"], "hello worl")])
def test_stop_strings(tok, stop, want):
    pieces, out = run(tok, "hello world, again", stop=stop)
    assert "".join(pieces) == out.text == want
    assert out.stopped_by == (None if want == "hello world, again" else next(s for s in stop if s in "hello world, again" and "hello world, again".index(s) == len(want)))


def test_include_stop_string(tok):
    pieces, out = run(tok, "hello world, again", stop=["world"], include_stop_str_in_output=True)
    assert "".join(pieces) == "hello world"


def test_partial_stop_is_held_back_then_released(tok):
    out = TextOutput(tok, [], SamplingParams(stop=["world peace"]))
    ids = tok.encode("hello world again", add_special_tokens=False)
    assert [tok.decode([t]) for t in ids] == ["hello", " world", " again"]
    assert out.add([ids[0]]) == "hello"
    assert out.add([ids[1]]) == " "  # "world" could start "world peace": withheld
    assert out.add([ids[2]]) == "world again"  # it did not
    assert out.finish() == "" and out.stopped_by is None
