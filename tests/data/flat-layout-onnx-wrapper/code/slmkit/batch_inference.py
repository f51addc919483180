"""Answering a table of conversations with either chat model, row by row, without losing rows.

The `batch_infer` step distributes the table with Spark through `mlflow.pyfunc.spark_udf`; the
model that UDF loads is `wrappers/batch_chat_model.py`, which holds the chat model as an artifact
and answers each pandas batch with `answer_requests` below. The `local` engine calls the same
function in process. So both engines give the same answers, and one refused row (a context
overflow, a bad role) gets its message in `error` instead of failing the batch.

Each row travels as one JSON `request` string (its messages and optional max_tokens and
temperature): a single string column crosses Arrow, Spark and pandas unchanged, Unicode included.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from slmkit.chat_models import ChatModel, WrapperChat, is_refusal

REQUEST_COLUMN = "request"
ANSWER_COLUMN = "answer_json"
ROW_FIELDS = ("max_tokens", "temperature")
# Spark's type for each output column, in order; `answer` … `error` are added to every input row.
OUTPUT_TYPES = {
    "answer": "string",
    "finish_reason": "string",
    "prompt_tokens": "int",
    "completion_tokens": "int",
    "error": "string",
}
OUTPUT_DDL = ", ".join(f"{name} {kind}" for name, kind in OUTPUT_TYPES.items())


@dataclass(frozen=True)
class RowAnswer:
    """One row's answer, or the reason it has none."""

    answer: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """numpy arrays and scalars, as pandas and Arrow hand them over, as plain JSON values."""
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def row_request(messages: Any, max_tokens: Any = None, temperature: Any = None, default_max_tokens: int = 0) -> str:
    """The JSON request of one input row; a row's own max_tokens wins over the step's default."""
    request: dict[str, Any] = {"messages": _plain(messages)}
    if isinstance(request["messages"], str):  # a JSONL or Parquet column may hold the messages as JSON text
        with contextlib.suppress(ValueError):  # not JSON: refused by name when answered
            request["messages"] = json.loads(request["messages"])
    if _given(max_tokens):
        request["max_tokens"] = _plain(max_tokens)
    elif default_max_tokens:
        request["max_tokens"] = default_max_tokens
    if _given(temperature):
        request["temperature"] = _plain(temperature)
    return json.dumps(request, ensure_ascii=False)


def answer_request(chat: ChatModel, request: str) -> RowAnswer:
    """One row: the model's answer, or the refusal's message in `error`."""
    try:
        raw = json.loads(request)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        return RowAnswer(error=f"the row is not a chat request: {error}")
    try:
        answer = chat.complete(raw)
    except Exception as error:
        if not is_refusal(error):
            raise  # a failure of the model, not of the row: Spark retries the task, then fails the job
        return RowAnswer(error=getattr(error, "message", None) or str(error))
    choice = answer["choices"][0]
    return RowAnswer(
        answer=choice["message"]["content"] or "",
        finish_reason=choice["finish_reason"],
        prompt_tokens=int(answer["usage"]["prompt_tokens"]),
        completion_tokens=int(answer["usage"]["completion_tokens"]),
    )


def default_concurrency(chat: ChatModel) -> int:
    """Rows answered at once: the ONNX wrapper decodes concurrent greedy rows as one batch (up to
    its max_batch_size, 4 by default); MLflow's transformers flavor gains nothing from threads."""
    return 4 if isinstance(chat, WrapperChat) else 1


def answer_requests(chat: ChatModel, requests: Sequence[str], concurrency: int) -> list[RowAnswer]:
    """Every row's answer, in the rows' order."""
    if concurrency <= 1:
        return [answer_request(chat, request) for request in requests]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="slmkit-row") as pool:
        return list(pool.map(lambda request: answer_request(chat, request), requests))


def answers_json(answers: Sequence[RowAnswer]) -> Any:
    """The batch model's output: one JSON object per row in a single string column. spark_udf
    casts a struct's fields per batch and cannot keep an error row's empty fields null; Spark
    parses this column with OUTPUT_DDL instead, where they stay null."""
    import pandas as pd

    return pd.DataFrame({ANSWER_COLUMN: [json.dumps(asdict(answer), ensure_ascii=False) for answer in answers]})


def answers_frame(answers_json: Sequence[str]) -> Any:
    """The answer columns (OUTPUT_TYPES, nullable) of the batch model's JSON output, in process."""
    import pandas as pd

    frame = pd.DataFrame([json.loads(answer) for answer in answers_json], columns=list(OUTPUT_TYPES))
    for name, kind in OUTPUT_TYPES.items():
        frame[name] = frame[name].astype("Int32" if kind == "int" else "string")
    return frame
