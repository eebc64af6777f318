"""OpenAI JSON shapes built from hand-made outputs (no model, no HTTP): completions, chat, chunks, SSE, errors."""

from __future__ import annotations

import json

import pytest

from loom.errors import (AuthenticationError, ContextLengthError, EngineUnavailableError, InvalidPromptError,
                         InvalidRequestError, ModelNotFoundError, PayloadTooLargeError, QueueFullError)
from loom.outputs import CompletionOutput, Logprob, RequestOutput, StreamDelta
from loom.serve import openai_format as fmt
from loom.serve.errors import ClientDisconnectedError, MethodNotAllowedError, RequestFailedError, error_response
from loom.tokenizer import ChatTemplateError

ENV = fmt.Envelope("cmpl-1", 1700000000, "tiny")
VOCAB = {1: "A", 2: "b", 3: "c", 4: "é", 5: "!"}


def decode(ids) -> str:
    return "".join(VOCAB[t] for t in ids)


def entry(chosen: int, logprob: float, *alternatives: tuple[int, float]) -> dict[int, Logprob]:
    """One position: the chosen token and its alternatives, ranked by logprob."""
    items = sorted([(chosen, logprob), *alternatives], key=lambda kv: -kv[1])
    return {t: Logprob(lp, rank + 1, VOCAB[t]) for rank, (t, lp) in enumerate(items)}


def test_usage_envelope_and_models():
    assert fmt.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert fmt.Envelope("x", 5, "m").wrap("text_completion", [], usage=None) == {
        "id": "x", "object": "text_completion", "created": 5, "model": "m", "choices": [], "usage": None}
    card = fmt.model_card("tiny", 7, 2048)
    assert card == {"id": "tiny", "object": "model", "created": 7, "owned_by": "loom", "max_model_len": 2048}
    assert fmt.model_list([card]) == {"object": "list", "data": [card]}


def test_sse_lines():
    assert fmt.sse({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'
    assert fmt.SSE_DONE == "data: [DONE]\n\n"


def test_completion_logprobs_legacy_object():
    lp = fmt.completion_logprobs([2, 4], [entry(2, -0.5, (3, -1.5)), entry(4, -0.1)], offset=10)
    assert lp == {"tokens": ["b", "é"], "token_logprobs": [-0.5, -0.1],
                  "top_logprobs": [{"b": -0.5, "c": -1.5}, {"é": -0.1}], "text_offset": [10, 11]}
    assert list(lp["top_logprobs"][0]) == ["b", "c"]  # most likely first
    assert fmt.completion_logprobs([2], None) == fmt.empty_completion_logprobs()


def test_completion_response_with_two_prompts_and_n_2():
    outs = [RequestOutput("r0", None, [1], [CompletionOutput(0, "bc", [2, 3], "length"),
                                            CompletionOutput(1, "b!", [2, 5], "stop", "!")]),
            RequestOutput("r1", None, [1, 2], [CompletionOutput(0, "c", [3], "stop"),
                                               CompletionOutput(1, "", [], "abort")])]
    body = fmt.completion_response(ENV, outs, decode)
    assert body == {
        "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny",
        "choices": [{"index": 0, "text": "bc", "logprobs": None, "finish_reason": "length"},
                    {"index": 1, "text": "b!", "logprobs": None, "finish_reason": "stop"},
                    {"index": 2, "text": "c", "logprobs": None, "finish_reason": "stop"},
                    {"index": 3, "text": "", "logprobs": None, "finish_reason": "abort"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


def test_completion_echo_with_logprobs_scores_the_prompt():
    prompt_lp = [None, entry(2, -2.0, (3, -0.25))]
    out = RequestOutput("r", "Ab", [1, 2], [CompletionOutput(0, "c", [3], "length", logprobs=[entry(3, -0.3)])],
                        prompt_logprobs=prompt_lp)
    body = fmt.completion_response(ENV, [out], decode, echo=True, logprobs=True)
    (choice,) = body["choices"]
    assert choice["text"] == "Abc" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"tokens": ["A", "b", "c"], "token_logprobs": [None, -2.0, -0.3],
                                  "top_logprobs": [None, {"c": -0.25, "b": -2.0}, {"c": -0.3}],
                                  "text_offset": [0, 1, 2]}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    # max_tokens 0 (lm-evaluation-harness): the prompt alone, "length", nothing generated
    only = fmt.completion_response(ENV, [out], decode, echo=True, echo_only=True, logprobs=True)
    assert only["choices"][0]["text"] == "Ab" and only["choices"][0]["finish_reason"] == "length"
    assert only["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]
    assert only["usage"]["completion_tokens"] == 0


def test_completion_stream_chunks_join_to_the_whole():
    stream = fmt.CompletionStream(ENV, [[1]], 1, decode, echo=True, logprobs=True)
    first = StreamDelta("b", [2], request_id="r", logprobs=[entry(2, -0.5)], prompt_logprobs=[None],
                        prompt_token_ids=[1])
    last = StreamDelta("é", [4], "stop", request_id="r", logprobs=[entry(4, -0.2)])
    c1, c2 = stream.chunk(0, first), stream.chunk(0, last)
    assert c1 == {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny",
                  "choices": [{"index": 0, "text": "Ab", "finish_reason": None,
                               "logprobs": {"tokens": ["A", "b"], "token_logprobs": [None, -0.5],
                                            "top_logprobs": [None, {"b": -0.5}], "text_offset": [0, 1]}}]}
    assert c2["choices"] == [{"index": 0, "text": "é", "finish_reason": "stop",
                              "logprobs": {"tokens": ["é"], "token_logprobs": [-0.2], "top_logprobs": [{"é": -0.2}],
                                           "text_offset": [2]}}]
    assert stream.usage_chunk() == {"id": "cmpl-1", "object": "text_completion", "created": 1700000000,
                                    "model": "tiny", "choices": [],
                                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def test_completion_stream_numbers_choices_across_prompts():
    stream = fmt.CompletionStream(ENV, [[1], [1, 2]], 2, decode)
    chunk = stream.chunk(1, StreamDelta("c", [3], request_id="r1", index=1))
    assert chunk["choices"] == [{"index": 3, "text": "c", "logprobs": None, "finish_reason": None}]


def test_chat_logprobs_object():
    lp = fmt.chat_logprobs([4], [entry(4, -0.1, (2, -3.0), (3, -4.0))], top_n=2)
    assert lp == {"content": [{"token": "é", "logprob": -0.1, "bytes": [195, 169],
                               "top_logprobs": [{"token": "é", "logprob": -0.1, "bytes": [195, 169]},
                                                {"token": "b", "logprob": -3.0, "bytes": [98]}]}]}
    assert fmt.chat_logprobs([4], [entry(4, -0.1, (2, -3.0))], top_n=0)["content"][0]["top_logprobs"] == []


def test_chat_completion_response():
    env = fmt.Envelope("chatcmpl-1", 9, "tiny")
    out = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "b!", [2, 5], "stop", logprobs=None),
                                               CompletionOutput(1, "c", [3], "length", logprobs=None)])
    assert fmt.chat_completion_response(env, out) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 9, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "b!"}, "logprobs": None,
                     "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": "c"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    with_lp = RequestOutput("r", None, [1], [CompletionOutput(0, "b", [2], "stop", logprobs=[entry(2, -0.5)])])
    choice = fmt.chat_completion_response(env, with_lp, top_logprobs=0)["choices"][0]
    assert choice["logprobs"] == {"content": [{"token": "b", "logprob": -0.5, "bytes": [98], "top_logprobs": []}]}


def test_chat_stream_chunks():
    env = fmt.Envelope("chatcmpl-1", 9, "tiny")
    roles = fmt.chat_role_chunks(env, 2)
    assert roles[1] == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 9, "model": "tiny",
                        "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]}
    content, finish = fmt.chat_delta_chunks(env, StreamDelta("b", [2], "stop", index=1))
    assert content["choices"] == [{"index": 1, "delta": {"content": "b"}, "logprobs": None, "finish_reason": None}]
    assert finish["choices"] == [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert fmt.chat_delta_chunks(env, StreamDelta("", [], None)) == []  # nothing to say
    (with_lp,) = fmt.chat_delta_chunks(env, StreamDelta("b", [2], logprobs=[entry(2, -0.5)]), top_logprobs=1)
    assert with_lp["choices"][0]["logprobs"]["content"][0]["token"] == "b"
    assert fmt.chat_usage_chunk(env, 3, 4) == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 9,
                                              "model": "tiny", "choices": [],
                                              "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                        "total_tokens": 7}}


@pytest.mark.parametrize("error,status,type_,param,code", [
    (InvalidRequestError("bad"), 400, "invalid_request_error", None, None),
    (InvalidRequestError("bad", param="top_p"), 400, "invalid_request_error", "top_p", None),
    (InvalidPromptError("empty"), 400, "invalid_request_error", "prompt", None),
    (ContextLengthError("long"), 400, "invalid_request_error", "prompt", "context_length_exceeded"),
    (ChatTemplateError("no template"), 400, "invalid_request_error", "messages", None),
    (AuthenticationError("key"), 401, "authentication_error", None, "invalid_api_key"),
    (ModelNotFoundError("gpt"), 404, "not_found_error", "model", "model_not_found"),
    (MethodNotAllowedError("GET"), 405, "invalid_request_error", None, None),
    (PayloadTooLargeError("big"), 413, "invalid_request_error", None, "request_too_large"),
    (ClientDisconnectedError("gone"), 499, "invalid_request_error", None, None),
    (RequestFailedError("step"), 500, "server_error", None, None),
    (QueueFullError("full"), 503, "service_unavailable", None, "queue_full"),
    (EngineUnavailableError("stopped"), 503, "service_unavailable", None, None),
])
def test_errors_map_by_type(error, status, type_, param, code):
    response = error_response(error)
    body = json.loads(response.body)
    assert response.status_code == status
    assert body == {"error": {"message": ("the server is busy: " if code == "queue_full" else "") + str(error),
                              "type": type_, "param": param, "code": code}}


def test_unknown_errors_are_500_without_their_message():
    response = error_response(KeyError("secret"))
    assert response.status_code == 500
    assert json.loads(response.body)["error"] == {"message": "internal error: KeyError", "type": "server_error",
                                                  "param": None, "code": None}


def test_typed_errors_are_still_the_builtins():
    assert issubclass(ContextLengthError, ValueError) and issubclass(ChatTemplateError, ValueError)
    assert issubclass(QueueFullError, RuntimeError) and issubclass(EngineUnavailableError, RuntimeError)
