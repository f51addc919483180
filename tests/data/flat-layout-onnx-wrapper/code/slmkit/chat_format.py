"""The OpenAI-style chat request and response, shared by the ONNX wrapper and the evaluation.

Both logged models speak this contract: the transformers pipeline through MLflow's
`llm/v1/chat` task, the ONNX wrapper through the functions below. Everything here is pure and
raises `ChatRequestError` naming the offending field; the wrapper turns that into the HTTP 400
MLflow's scoring server sends for `MlflowException.invalid_parameter_value`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
# Phi-3-mini-4k-instruct's chat template, for the Phi-3 checkpoints built here without the hub
# (the tests' tiny one, the bench's flagship-shaped one); a hub checkpoint carries its own.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# `truncation`: refuse a conversation past the context, or drop its oldest non-system turns.
TRUNCATION_MODES = ("none", "oldest")
# C0 controls other than tab, newline and carriage return, and DEL: never meaningful in a chat.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# No token is longer than this many characters, so longer text cannot fit the context: refuse it
# before tokenizing megabytes.
MAX_CHARS_PER_TOKEN = 32
REQUEST_FIELDS = (
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "n",
    "stream",
    "seed",
    "truncation",
)
_FIELD_PATH = re.compile(r"^([a-z_]+)((?:\[\d+\])?(?:\.[a-z_]+)?)")

Messages = tuple[tuple[str, str], ...]


class ChatRequestError(ValueError):
    """A request that breaks the contract; the message starts with the field's name."""

    @property
    def param(self) -> str | None:
        """The offending field as the message names it (`messages[0].role`), for OpenAI's `param`."""
        match = _FIELD_PATH.match(str(self))
        return match.group(0) if match and match.group(1) in REQUEST_FIELDS else None


@dataclass(frozen=True)
class ChatRequest:
    """One validated request. Exactly one of `messages` and `prompt` is set.

    `prompt` is the seed notebook's raw request: text already formatted with the chat template.
    Unset generation fields are None and fall back to the model's logged defaults.
    """

    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    truncation: str = "none"

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages or ()]


def _is_missing(value: Any) -> bool:
    """Pandas fills absent optional columns with None or NaN; both mean 'not given'."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value: Any) -> Any:
    """Schema enforcement hands arrays over as numpy arrays; treat them as lists."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ChatRequestError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ChatRequestError(f"{name} must be at least {minimum}, got {int(value)}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChatRequestError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _text(name: str, value: str) -> str:
    match = _CONTROL_CHARACTERS.search(value)
    if match:
        raise ChatRequestError(
            f"{name} contains the control character U+{ord(match.group()):04X} at position {match.start()}"
        )
    return value


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    value = _as_list(value)
    if not isinstance(value, list) or not value:
        raise ChatRequestError("messages must be a non-empty list of {role, content} objects")
    parsed = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ChatRequestError(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatRequestError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatRequestError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        if role != "assistant" and not content.strip():
            raise ChatRequestError(f"messages[{index}].content is empty")
        parsed.append((role, _text(f"messages[{index}].content", content)))
    return tuple(parsed)


def parse_request(raw: Mapping[str, Any], streaming: bool = False) -> ChatRequest:
    """Validate one raw request (a JSON object) into a ChatRequest.

    Args:
        raw: the request.
        streaming: the caller streams, so `stream: true` is welcome rather than refused.

    Raises:
        ChatRequestError: the first field that breaks the contract, named in the message.
    """
    given = {key: value for key, value in raw.items() if not _is_missing(value)}
    messages, prompt = given.get("messages"), given.get("prompt")
    if messages is not None and prompt is not None:
        raise ChatRequestError("messages and prompt are exclusive: send one of them")
    if messages is None and prompt is None:
        raise ChatRequestError("messages is required: a non-empty list of {role, content} objects")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ChatRequestError("prompt must be a non-empty string")
    if prompt is not None:
        _text("prompt", prompt)
    n = _integer("n", given["n"], 1) if "n" in given else 1
    if n != 1:
        raise ChatRequestError(f"n={n} is not supported: send {n} requests, with a seed each for distinct samples")
    if given.get("stream") and not streaming:
        raise ChatRequestError("stream=true is not supported by predict; call predict_stream instead")
    temperature = _number("temperature", given["temperature"]) if "temperature" in given else None
    if temperature is not None and temperature < 0:
        raise ChatRequestError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    top_p = _number("top_p", given["top_p"]) if "top_p" in given else None
    if top_p is not None and not 0 < top_p <= 1:
        raise ChatRequestError(f"top_p must be in (0, 1], got {top_p}")
    stop = _as_list(given.get("stop", []))
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ChatRequestError("stop must be a list of non-empty strings")
    truncation = given.get("truncation", "none")
    if truncation not in TRUNCATION_MODES:
        raise ChatRequestError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
    return ChatRequest(
        messages=_messages(messages) if messages is not None else None,
        prompt=prompt,
        max_tokens=_integer("max_tokens", given["max_tokens"], 1) if "max_tokens" in given else None,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(stop),
        seed=_integer("seed", given["seed"], 0) if "seed" in given else None,
        truncation=truncation,
    )


def raw_requests(model_input: Any) -> list[dict[str, Any]]:
    """The raw requests in whatever pyfunc handed over: a dict, a list of dicts, or a DataFrame."""
    if isinstance(model_input, Mapping):
        return [dict(model_input)]
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    is_list = isinstance(model_input, Sequence) and not isinstance(model_input, (str, bytes))
    if is_list and all(isinstance(item, Mapping) for item in model_input):
        return [dict(item) for item in model_input]
    raise ChatRequestError("the input must be a chat request object with a messages field")


def without_oldest_turn(messages: Messages) -> Messages | None:
    """The conversation minus its oldest non-system turn; None when only the last turn is left."""
    droppable = [i for i, (role, _) in enumerate(messages[:-1]) if role != "system"]
    if not droppable:
        return None
    return messages[: droppable[0]] + messages[droppable[0] + 1 :]


def fit_to_context(
    request: ChatRequest,
    render: Callable[[Messages], str],
    encode: Callable[[str], Sequence[int]],
    context_length: int,
) -> tuple[Messages | None, Sequence[int]]:
    """The messages that fit the context and their prompt's token ids, for either model.

    `render` applies the model's chat template, `encode` its tokenizer. A conversation past the
    context is refused before any generation, or, with `truncation="oldest"`, loses its oldest
    non-system turns until it fits. Text too long for any tokenization to fit is refused unread.

    Raises:
        ChatRequestError: the prompt does not fit, naming its size and the context.
    """
    messages = request.messages
    while True:
        field, text = ("prompt", request.prompt) if request.prompt is not None else ("messages", render(messages))
        readable = len(text) <= context_length * MAX_CHARS_PER_TOKEN
        if readable:
            ids = encode(text)
            if len(ids) < context_length:
                return messages, ids
        shorter = without_oldest_turn(messages) if request.truncation == "oldest" and messages else None
        if shorter is None:
            size = f"{len(ids)} tokens" if readable else f"{len(text)} characters"
            hint = "" if request.truncation == "oldest" else ", or send truncation='oldest' to drop old turns"
            raise ChatRequestError(
                f"{field}: the prompt has {size}, past the model's context of {context_length} tokens; shorten it{hint}"
            )
        messages = shorter


def check_max_tokens(max_tokens: int, context_length: int) -> int:
    """Refuse a completion budget no request could use: more tokens than the whole context."""
    if max_tokens > context_length:
        raise ChatRequestError(
            f"max_tokens must be at most the model's context of {context_length} tokens, got {max_tokens}"
        )
    return max_tokens


class StopScanner:
    """Streams text while watching for stop strings that may span several pieces.

    Text that could still turn out to be the start of a stop string is held back until the
    next piece decides it, so a streamed answer never shows what `predict` would have cut.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a decoded piece; return what can be shown now."""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self._stop)
        if self.stopped:
            self.text = cut
            return self.flush()
        safe = max(self._sent, len(self.text) - self._hold)
        shown, self._sent = self.text[self._sent : safe], safe
        return shown

    def flush(self) -> str:
        """What was held back, once generation has ended."""
        shown, self._sent = self.text[self._sent :], len(self.text)
        return shown


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; return the text and whether one was found."""
    cuts = [index for index in (text.find(s) for s in stop) if index >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def chat_completion(
    content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, model: str
) -> dict[str, Any]:
    """A ChatCompletion dict in the shape MLflow's `llm/v1/chat` models return."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str | None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One streamed ChatCompletionChunk in the OpenAI shape; the last carries the usage."""
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def response_text(response: Any) -> str:
    """The assistant's text from a ChatCompletion, as either model returns it from pyfunc."""
    if isinstance(response, list):
        response = response[0]
    return response["choices"][0]["message"]["content"] or ""


def chat_signature() -> Any:
    """The ONNX wrapper's signature: MLflow's chat request shape, with our own field checks.

    Declared explicitly: a signature inferred from an example makes every field required.
    `messages` keeps its typed shape so the signature documents it, and is optional only because
    the seed's raw `prompt` request is accepted instead. The scalar fields are `Any`: schema
    enforcement would refuse `"temperature": -1` or `"stop": "x"` with messages that do not
    always name the field, while `parse_request` names it every time.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.llm import CHAT_MODEL_OUTPUT_SCHEMA
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Object, Property, Schema

    message = Object([Property("role", DataType.string), Property("content", DataType.string, False)])
    fields = ("prompt", "temperature", "max_tokens", "stop", "n", "stream", "top_p", "seed", "truncation")
    inputs = Schema(
        [
            ColSpec(name="messages", type=Array(message), required=False),
            *(ColSpec(name=name, type=AnyType(), required=False) for name in fields),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=CHAT_MODEL_OUTPUT_SCHEMA)
