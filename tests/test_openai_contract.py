"""The OpenAI side of the serving front, as pure functions: request mapping and stream shape."""

import json

import pytest

from slmkit.chat.contract import chat_chunk
from slmkit.serving.protocol import OpenAIError, openai_chunks, openai_request, request_error

USER = [{"role": "user", "content": "Hi"}]


def test_openai_only_fields_are_dropped_and_new_names_mapped():
    raw = {"model": "tiny", "messages": USER, "user": "u1", "max_completion_tokens": 5, "stream_options": {}}
    assert openai_request(raw, "tiny") == {"messages": USER, "max_tokens": 5}


def test_an_explicit_max_tokens_wins_over_max_completion_tokens():
    assert openai_request({"messages": USER, "max_tokens": 3, "max_completion_tokens": 9}, "tiny")["max_tokens"] == 3


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        ([USER], 422, None),
        ({"model": "gpt-4o", "messages": USER}, 404, "model"),
        ({"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": USER, "logprobs": True}, 400, "logprobs"),
        ({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ],
)
def test_what_the_server_cannot_honour_is_refused_by_name(raw, status, param):
    with pytest.raises(OpenAIError) as refused:
        openai_request(raw, "tiny")
    assert (refused.value.status, refused.value.param) == (status, param)
    body = json.loads(refused.value.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_a_model_without_a_name_answers_to_any():
    assert openai_request({"model": "whatever", "messages": USER}, "") == {"messages": USER}


def test_zero_penalties_and_false_logprobs_are_accepted():
    raw = {"messages": USER, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False}
    assert openai_request(raw, "tiny") == raw


def test_a_model_refusal_becomes_a_400_naming_the_field():
    from mlflow.exceptions import MlflowException

    error = request_error(MlflowException.invalid_parameter_value("max_tokens must be at least 1, got 0"))
    assert (error.status, error.param) == (400, "max_tokens")


def model_chunks():
    yield chat_chunk("c1", 1, "tiny", "Pa", None)
    yield chat_chunk("c1", 1, "tiny", "ris", None)
    yield chat_chunk("c1", 1, "tiny", "", "stop", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})


def test_with_include_usage_one_more_chunk_carries_the_usage_and_no_choices():
    chunks = list(openai_chunks(model_chunks(), include_usage=True))
    assert [c["usage"] for c in chunks[:-1]] == [None, None, None]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_without_include_usage_no_chunk_carries_usage():
    chunks = list(openai_chunks(model_chunks(), include_usage=False))
    assert len(chunks) == 3
    assert all("usage" not in chunk for chunk in chunks)
