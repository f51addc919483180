"""OpenAI's Chat Completions protocol as this server speaks it: request mapping, error and stream shapes.

Pure functions over dicts: the routes (`slmkit.serving.routes`) call them, and tests check them
without a server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException

from slmkit.chat.contract import ChatRequestError

CHAT_ROUTE = "/v1/chat/completions"
# OpenAI request fields this server cannot honour: refused by name rather than ignored.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "logprobs", "top_logprobs")
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                422: "invalid_request_error", 503: "server_overloaded", 504: "timeout"}  # fmt: skip


@dataclass
class OpenAIError(Exception):
    """An error answered on `/v1/…` as `{"error": {message, type, param, code}}`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> bytes:
        error = {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error")}
        return json.dumps({"error": {**error, "param": self.param, "code": self.code}}).encode()


TIMEOUT = OpenAIError(
    504, "the request took longer than the server's timeout (-t); ask for fewer max_tokens or serve with a larger -t",
    None, "timeout",
)  # fmt: skip


def model_failure(error: Exception) -> OpenAIError:
    """A 500 for a failure of the model itself, naming it without a traceback."""
    return OpenAIError(500, f"the model failed: {type(error).__name__}: {error}", None, "model_error")


def request_error(error: ChatRequestError | MlflowException) -> OpenAIError:
    """A 400 naming the field, from either model's refusal (the wrapper raises MlflowException)."""
    message = error.message if isinstance(error, MlflowException) else str(error)
    return OpenAIError(400, message, ChatRequestError(message).param, "invalid_request")


def openai_request(raw: Any, served_name: str) -> dict[str, Any]:
    """The chat request in an OpenAI body, in the contract both models speak.

    OpenAI-only fields are dropped (`model` once checked, `user`, `stream_options`), newer
    names mapped (`max_completion_tokens`), and features this server lacks refused by name.
    """
    if not isinstance(raw, dict):
        raise OpenAIError(422, f"the body must be a JSON object, got {type(raw).__name__}", None, "invalid_body")
    model = raw.get("model")
    if model is not None and served_name and model != served_name:
        raise OpenAIError(404, f"model {model!r} is not served here; this server serves {served_name!r}", "model",
                          "model_not_found")  # fmt: skip
    for field in UNSUPPORTED_FIELDS:
        if raw.get(field) not in (None, False, [], {}):
            raise OpenAIError(400, f"{field} is not supported by this server", field, "unsupported_parameter")
    for field in ("frequency_penalty", "presence_penalty"):
        if raw.get(field) not in (None, 0, 0.0):
            raise OpenAIError(400, f"{field} is not supported by this server: send 0 or leave it out", field,
                              "unsupported_parameter")  # fmt: skip
    request = {key: value for key, value in raw.items() if key not in ("model", "user", "stream_options")}
    if "max_completion_tokens" in request:
        request.setdefault("max_tokens", request.pop("max_completion_tokens"))
        request.pop("max_completion_tokens", None)
    return request


def wants_usage_chunk(raw: dict[str, Any]) -> bool:
    options = raw.get("stream_options") or {}
    return isinstance(options, dict) and bool(options.get("include_usage"))


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


def openai_chunks(chunks: Iterator[dict[str, Any]], include_usage: bool) -> Iterator[dict[str, Any]]:
    """The models' chunks (usage on the closing one) in OpenAI's stream shape: every chunk has
    `usage: null`, and with `include_usage` one more chunk follows with no choices and the usage."""
    for chunk in chunks:
        usage = chunk.pop("usage", None)
        yield {**chunk, "usage": None} if include_usage else chunk
        if usage is not None and include_usage:
            yield {**chunk, "choices": [], "usage": usage}
