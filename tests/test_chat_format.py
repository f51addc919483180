"""The chat request contract both models share: what is accepted, and what is refused and why."""

import pandas as pd
import pytest

from slmkit.chat.contract import (
    ChatRequest,
    ChatRequestError,
    chat_completion,
    check_max_tokens,
    cut_at_stop,
    fit_to_context,
    parse_request,
    raw_requests,
    response_text,
)

USER = {"role": "user", "content": "Hi"}


def test_full_request_is_parsed():
    request = parse_request(
        {
            "messages": [{"role": "system", "content": "Be brief."}, USER],
            "max_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n"],
            "n": 1,
            "seed": 3,
        }
    )
    assert request == ChatRequest(
        messages=(("system", "Be brief."), ("user", "Hi")),
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        stop=("\n",),
        seed=3,
    )


def test_optional_fields_may_be_absent_or_nan_from_pandas():
    assert parse_request({"messages": [USER]}) == ChatRequest(messages=(("user", "Hi"),))
    assert parse_request({"messages": [USER], "max_tokens": float("nan"), "stop": None}).max_tokens is None


def test_seed_raw_prompt_request_is_accepted():
    assert parse_request({"prompt": "<|user|>\nHi<|end|>\n<|assistant|>\n"}).prompt.startswith("<|user|>")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "messages is required"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": "  "}]}, r"messages\[0\].content is empty"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"messages": [USER], "max_tokens": -5}, "max_tokens must be at least 1"),
        ({"messages": [USER], "max_tokens": "10"}, "max_tokens must be an integer"),
        ({"messages": [USER], "max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"messages": [USER], "temperature": -0.1}, "temperature must be >= 0"),
        ({"messages": [USER], "top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"messages": [USER], "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"messages": [USER], "stop": "\n"}, "stop must be a list of non-empty strings"),
        ({"messages": [USER], "stop": [1]}, "stop must be a list of non-empty strings"),
        ({"messages": [USER], "n": 2}, "n=2 is not supported"),
        ({"messages": [USER], "stream": True}, "predict_stream"),
        ({"messages": [USER], "prompt": "x"}, "exclusive"),
        ({"prompt": ""}, "prompt must be a non-empty string"),
    ],
)
def test_invalid_requests_name_the_field(raw, field):
    with pytest.raises(ChatRequestError, match=field):
        parse_request(raw)


def test_raw_requests_from_dict_list_and_dataframe():
    assert raw_requests({"messages": [USER]}) == [{"messages": [USER]}]
    assert raw_requests([{"messages": [USER]}, {"prompt": "x"}])[1] == {"prompt": "x"}
    frame = pd.DataFrame([{"messages": [USER], "max_tokens": 4}])
    assert raw_requests(frame)[0]["max_tokens"] == 4
    with pytest.raises(ChatRequestError, match="chat request object"):
        raw_requests("hello")


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_at_stop("one. two\nthree", [".", "\n"]) == ("one", True)
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", False)


def test_chat_completion_has_the_openai_shape_and_usage_sums():
    response = chat_completion("Paris", "stop", prompt_tokens=12, completion_tokens=3, model="tiny")
    assert response["object"] == "chat.completion"
    assert response["id"].startswith("chatcmpl-")
    assert response["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    ]
    assert response["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert response_text([response]) == "Paris"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
        ({"messages": [USER], "n": 2}, "n"),
        ({"messages": [USER], "top_p": 2}, "top_p"),
    ],
)
def test_a_refusal_names_its_field_as_openai_param(raw, param):
    with pytest.raises(ChatRequestError) as refused:
        parse_request(raw)
    assert refused.value.param == param


def test_a_message_that_names_no_field_has_no_param():
    assert ChatRequestError("the input must be a chat request object").param is None


def words(text: str) -> list[str]:
    """A stand-in tokenizer: one token per word, so sizes are easy to read."""
    return text.split()


def render(messages) -> str:
    return " ".join(f"<{role}> {content}" for role, content in messages)


def test_fit_to_context_keeps_a_fitting_conversation_whole():
    request = parse_request({"messages": [USER]})
    messages, ids = fit_to_context(request, render, words, context_length=8)
    assert messages == (("user", "Hi"),)
    assert ids == ["<user>", "Hi"]


def test_fit_to_context_refuses_or_drops_the_oldest_turns_on_request():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two three four"},
             {"role": "assistant", "content": "five six"}, {"role": "user", "content": "seven"}]  # fmt: skip
    with pytest.raises(ChatRequestError, match="messages: the prompt has 13 tokens, past the model's context of 8"):
        fit_to_context(parse_request({"messages": turns}), render, words, context_length=8)
    messages, ids = fit_to_context(parse_request({"messages": turns, "truncation": "oldest"}), render, words, 8)
    assert messages == (("system", "Be brief."), ("user", "seven"))
    assert len(ids) < 8


def test_fit_to_context_refuses_text_too_long_to_tokenize_without_reading_it():
    def never(text: str) -> list[str]:
        raise AssertionError("tokenized")

    request = parse_request({"messages": [{"role": "user", "content": "x" * 10_000}]})
    with pytest.raises(ChatRequestError, match="characters, past the model's context of 8 tokens"):
        fit_to_context(request, render, never, context_length=8)


def test_max_tokens_past_the_context_is_refused():
    assert check_max_tokens(8, 8) == 8
    with pytest.raises(ChatRequestError, match="max_tokens must be at most the model's context of 8 tokens, got 9"):
        check_max_tokens(9, 8)
