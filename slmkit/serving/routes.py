"""The chat routes: `/invocations` for chat bodies, `/v1/chat/completions`, `/v1/models`, `/metrics`.

Every chat request, on either route and for either model, goes through the app's `ChatService`
(`request.app.state.chat`), so it is checked by `slmkit.chat.contract` before it reaches the
model. `/invocations` keeps MLflow's shapes (a one-element list back, `{error_code, message}`
errors) and hands other payloads to MLflow's own handler; `/v1/…` answers OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

# Module level: FastAPI reads the routes' annotations (strings here) from this module's names.
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from mlflow.exceptions import MlflowException

from slmkit.chat.adapters import ChatModel, is_refusal
from slmkit.chat.contract import ChatRequestError
from slmkit.serving.metrics import ServingMetrics
from slmkit.serving.protocol import (
    CHAT_ROUTE,
    OpenAIError,
    model_failure,
    openai_chunks,
    openai_request,
    request_error,
    sse,
    wants_usage_chunk,
)
from slmkit.serving.streaming import prepend, stream_in_thread

logger = logging.getLogger(__name__)
router = APIRouter()


class ChatService:
    """One served chat model with its metrics, timeout and admission control (a bounded queue:
    past `max_in_flight` requests, a 503 at once)."""

    def __init__(self, chat: ChatModel, metrics: ServingMetrics, timeout_s: float, max_in_flight: int,
                 mlflow_invocations: Any) -> None:  # fmt: skip
        self.chat, self.metrics, self.timeout_s, self.max_in_flight = chat, metrics, timeout_s, max_in_flight
        self.mlflow_invocations = mlflow_invocations
        self.created = int(time.time())
        self.in_flight = 0

    def admit(self) -> None:
        if self.in_flight >= self.max_in_flight:
            raise OpenAIError(503, f"the server is answering {self.in_flight} requests already; retry later", None,
                              "overloaded")  # fmt: skip
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    async def answer(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One chat completion, counted."""
        self.admit()
        try:
            answer = await asyncio.to_thread(self.chat.complete, raw, self.deadline())
        finally:
            self.leave()
        self.metrics.count_usage(answer.get("usage"))
        return answer

    async def stream(self, chat_request: dict[str, Any], include_usage: bool) -> Response:
        """SSE chunks as the model makes them. The first is awaited before answering, so a
        request the model refuses (a context overflow) gets its 4xx, not a broken stream."""
        started = time.perf_counter()
        self.admit()
        chunks = stream_in_thread(openai_chunks(self.chat.stream(chat_request, self.deadline()), include_usage))
        try:
            first = await anext(chunks)
        except BaseException:
            self.leave()
            await chunks.aclose()
            raise
        return StreamingResponse(self._events(first, chunks, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def _events(self, first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]], started: float) -> AsyncIterator[bytes]:  # fmt: skip
        timed = False
        try:
            async for chunk in prepend(first, chunks):
                if not timed and any(choice["delta"].get("content") for choice in chunk["choices"]):
                    self.metrics.first_token.observe(time.perf_counter() - started)
                    timed = True
                self.metrics.count_usage(chunk.get("usage"))
                yield sse(chunk)
            yield sse("[DONE]")
        except Exception as error:  # the status is sent: the error goes into the stream, as OpenAI does
            logger.exception("chat completion stream failed")
            yield sse(json.loads(model_failure(error).body()))
        finally:
            self.leave()
            await chunks.aclose()


def _service(request: Request) -> ChatService:
    return request.app.state.chat


def openai_answer(status: int, body: Any) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def openai_error(error: OpenAIError) -> Response:
    return Response(error.body(), status_code=error.status, media_type="application/json")


def mlflow_error(error: ChatRequestError | MlflowException) -> Response:
    if isinstance(error, ChatRequestError):
        error = MlflowException.invalid_parameter_value(str(error))
    return Response(error.serialize_as_json(), status_code=error.get_http_status_code(), media_type="application/json")


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    """Chat requests go through the chat model; other payloads to MLflow's own handler."""
    service = _service(request)
    body = await request.body()
    try:
        raw = json.loads(body) if "json" in (request.headers.get("content-type") or "") else None
    except ValueError:
        raw = None
    if not (isinstance(raw, dict) and ("messages" in raw or "prompt" in raw)):
        return await service.mlflow_invocations.endpoint(request)
    try:
        return openai_answer(200, [await service.answer(raw)])
    except OpenAIError as error:
        return Response(MlflowException(error.message, error_code="TEMPORARILY_UNAVAILABLE").serialize_as_json(),
                        status_code=error.status, media_type="application/json")  # fmt: skip
    except Exception as error:
        if is_refusal(error):
            return mlflow_error(error)
        raise


@router.post(CHAT_ROUTE)
async def chat_completions(request: Request) -> Response:
    service = _service(request)
    try:
        raw = json.loads(await request.body())
    except ValueError as error:
        return openai_error(OpenAIError(400, f"the body is not valid JSON: {error}", None, "invalid_json"))
    try:
        chat_request = openai_request(raw, service.chat.name)
        if not chat_request.get("stream"):
            return openai_answer(200, await service.answer(chat_request))
        return await service.stream(chat_request, wants_usage_chunk(raw))
    except OpenAIError as error:
        return openai_error(error)
    except Exception as error:
        if is_refusal(error):
            return openai_error(request_error(error))
        logger.exception("chat completion failed")
        return openai_error(model_failure(error))


@router.get("/v1/models")
async def models(request: Request) -> Response:
    service = _service(request)
    model = {"id": service.chat.name, "object": "model", "created": service.created, "owned_by": "slmkit"}
    return openai_answer(200, {"object": "list", "data": [model]})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_service(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
async def unknown(rest: str) -> Response:
    return openai_error(OpenAIError(404, f"/v1/{rest} is not served here: use {CHAT_ROUTE} or /v1/models", None,
                                    "unknown_url"))  # fmt: skip
