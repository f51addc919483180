"""The serving front: MLflow's scoring app for a chat model, plus an OpenAI route and metrics.

`build_app` starts from the FastAPI app that `mlflow.pyfunc.scoring_server.init` builds, so
`/invocations`, `/ping`, `/health` and `/version` are MLflow's own, and adds:

- `POST /v1/chat/completions`: the OpenAI Chat Completions API, with Server-Sent Events for
  `"stream": true` (MLflow's server cannot stream over HTTP: mlflow/mlflow#12439);
- `GET /v1/models`: the served model in OpenAI's list shape;
- `GET /metrics`: Prometheus text exposition.

Every chat request, on either route and for either model, goes through `slmkit.chat_models`,
so it is checked by `slmkit.chat_format` before it reaches the model. `/invocations` keeps its
shapes (a one-element list back, MLflow's `{error_code, message}` errors); `/v1/…` answers
OpenAI's shapes, errors included. Bodies over `max_body_bytes` get a 413 on every route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

# Module level: FastAPI reads the routes' annotations (strings here) from this module's names.
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException

from slmkit.chat_format import ChatRequestError
from slmkit.chat_models import ChatModel, is_refusal

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_IN_FLIGHT = 64
CHAT_ROUTE = "/v1/chat/completions"
ROUTES = ("/invocations", CHAT_ROUTE, "/v1/models", "/metrics", "/ping", "/health", "/version")
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


class ServingMetrics:
    """The Prometheus metrics of one server; with several workers (PROMETHEUS_MULTIPROC_DIR set)
    every worker writes its own files and `/metrics` sums them (prometheus_client's multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

        self.registry = CollectorRegistry()
        shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if shared:
            multiprocess.MultiProcessCollector(self.registry)
        target = None if shared else self.registry
        self.requests = Counter("slmkit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=target)  # fmt: skip
        self.prompt_tokens = Counter("slmkit_prompt_tokens", "Prompt tokens of answered chat requests", registry=target)
        self.completion_tokens = Counter("slmkit_completion_tokens", "Completion tokens generated", registry=target)
        self.latency = Histogram("slmkit_request_seconds", "Time from request to the last byte of the answer",
                                 ["route"], registry=target,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        self.first_token = Histogram("slmkit_time_to_first_token_seconds",
                                     "Time from a streamed request to its first content chunk", registry=target,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
        self.in_flight = Gauge("slmkit_requests_in_flight", "Chat requests being answered now",
                               registry=target, multiprocess_mode="livesum")  # fmt: skip
        self.batch_size = Histogram("slmkit_batch_size", "Rows of each decoding batch as it starts",
                                    registry=target, buckets=(1, 2, 3, 4, 6, 8, 12, 16))  # fmt: skip

    def count_usage(self, usage: dict[str, int] | None) -> None:
        if usage:
            self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            self.completion_tokens.inc(usage.get("completion_tokens", 0))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def json_response(status: int, body: bytes) -> list[dict[str, Any]]:
    """The two ASGI messages of a complete JSON answer."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body}]  # fmt: skip


class Front:
    """ASGI middleware around the whole app: the body limit, the metrics of every request, and
    OpenAI's shape for MLflow's plain-text 504 on `/v1/…`."""

    def __init__(self, app: Any, metrics: ServingMetrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    def _too_large(self, path: str) -> list[dict[str, Any]]:
        message = f"the request body is larger than {self.max_body_bytes} bytes; send less, or serve with a larger --max-body-bytes"
        if path.startswith("/v1/"):
            return json_response(413, OpenAIError(413, message, None, "request_too_large").body())
        return json_response(
            413, MlflowException(message, error_code="REQUEST_LIMIT_EXCEEDED").serialize_as_json().encode()
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started, status = scope["path"], time.perf_counter(), [0]
        route = path if path in ROUTES else "other"

        async def answer(messages: list[dict[str, Any]]) -> None:
            for message in messages:
                await send(message)
            self.metrics.requests.labels(route, str(messages[0]["status"])).inc()

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if status[0] == 504 and path.startswith("/v1/"):  # MLflow's timeout answers in plain text
                    return  # sent whole with the end of the body
            elif status[0] == 504 and path.startswith("/v1/"):
                if not message.get("more_body"):
                    await answer(json_response(504, TIMEOUT.body()))
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.metrics.requests.labels(route, str(status[0])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_body_bytes:
                return await answer(self._too_large(path))
            return await self.app(scope, receive, send_counted)
        # No length announced (chunked): read the body here, up to the limit, and replay it.
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            if size > self.max_body_bytes:
                return await answer(self._too_large(path))
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def receive_replayed() -> dict[str, Any]:
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send_counted)


async def _stream_in_thread(chunks: Iterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Chunks made in a thread of their own, handed over as they come. When the consumer stops
    (the client went away), the thread stops at the next chunk and closes the generator, which
    drops the request's row from the ONNX wrapper's decoding batch."""
    loop, queue, stopped, end = asyncio.get_running_loop(), asyncio.Queue(), threading.Event(), object()

    def hand_over(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening
            stopped.set()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stopped.is_set():
                    break
                hand_over(chunk)
        except Exception as error:  # handed to the consumer, which answers or logs it
            hand_over(error)
        finally:
            getattr(chunks, "close", lambda: None)()
            hand_over(end)

    threading.Thread(target=produce, name="slmkit-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not end:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stopped.set()


def build_app(chat: ChatModel, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> Any:  # fmt: skip
    """MLflow's scoring app for the chat model's pyfunc model, with the chat routes added."""
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(chat.pyfunc_model)
    metrics = ServingMetrics()
    chat.observe_batches(metrics.batch_size.observe)
    timeout_s = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
    created = int(time.time())
    in_flight = [0]

    def openai_answer(status: int, body: Any) -> Response:
        return Response(json.dumps(body), status_code=status, media_type="application/json")

    def openai_error(error: OpenAIError) -> Response:
        return Response(error.body(), status_code=error.status, media_type="application/json")

    def mlflow_error(error: ChatRequestError | MlflowException) -> Response:
        if isinstance(error, ChatRequestError):
            error = MlflowException.invalid_parameter_value(str(error))
        return Response(
            error.serialize_as_json(), status_code=error.get_http_status_code(), media_type="application/json"
        )

    def admit() -> None:
        """Admission control keeps the queue bounded: past the limit, a 503 at once."""
        if in_flight[0] >= max_in_flight:
            raise OpenAIError(503, f"the server is answering {in_flight[0]} requests already; retry later", None,
                              "overloaded")  # fmt: skip
        in_flight[0] += 1
        metrics.in_flight.inc()

    def leave() -> None:
        in_flight[0] -= 1
        metrics.in_flight.dec()

    async def answered(raw: dict[str, Any]) -> dict[str, Any]:
        """One chat completion, counted."""
        admit()
        try:
            answer = await asyncio.to_thread(chat.complete, raw, time.monotonic() + timeout_s)
        finally:
            leave()
        metrics.count_usage(answer.get("usage"))
        return answer

    mlflow_invocations = next(route for route in app.router.routes if getattr(route, "path", "") == "/invocations")
    app.router.routes.remove(mlflow_invocations)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """Chat requests go through the chat model; other payloads to MLflow's own handler."""
        body = await request.body()
        try:
            raw = json.loads(body) if "json" in (request.headers.get("content-type") or "") else None
        except ValueError:
            raw = None
        if not (isinstance(raw, dict) and ("messages" in raw or "prompt" in raw)):
            return await mlflow_invocations.endpoint(request)
        try:
            return openai_answer(200, [await answered(raw)])
        except OpenAIError as error:
            return Response(MlflowException(error.message, error_code="TEMPORARILY_UNAVAILABLE").serialize_as_json(),
                            status_code=error.status, media_type="application/json")  # fmt: skip
        except Exception as error:
            if is_refusal(error):
                return mlflow_error(error)
            raise

    @app.post(CHAT_ROUTE)
    async def chat_completions(request: Request) -> Response:
        try:
            raw = json.loads(await request.body())
        except ValueError as error:
            return openai_error(OpenAIError(400, f"the body is not valid JSON: {error}", None, "invalid_json"))
        try:
            chat_request = openai_request(raw, chat.name)
            if not chat_request.get("stream"):
                return openai_answer(200, await answered(chat_request))
            return await stream_answer(chat_request, wants_usage_chunk(raw))
        except OpenAIError as error:
            return openai_error(error)
        except Exception as error:
            if is_refusal(error):
                return openai_error(request_error(error))
            logger.exception("chat completion failed")
            return openai_error(model_failure(error))

    async def stream_answer(chat_request: dict[str, Any], include_usage: bool) -> Response:
        """SSE chunks as the model makes them. The first is awaited before answering, so a
        request the model refuses (a context overflow) gets its 4xx, not a broken stream."""
        started = time.perf_counter()
        admit()
        chunks = _stream_in_thread(
            openai_chunks(chat.stream(chat_request, time.monotonic() + timeout_s), include_usage)
        )
        try:
            first = await anext(chunks)
        except BaseException:
            leave()
            await chunks.aclose()
            raise

        async def events() -> AsyncIterator[bytes]:
            timed = False
            try:
                async for chunk in _prepend(first, chunks):
                    if not timed and any(choice["delta"].get("content") for choice in chunk["choices"]):
                        metrics.first_token.observe(time.perf_counter() - started)
                        timed = True
                    metrics.count_usage(chunk.get("usage"))
                    yield sse(chunk)
                yield sse("[DONE]")
            except Exception as error:  # the status is sent: the error goes into the stream, as OpenAI does
                logger.exception("chat completion stream failed")
                yield sse(json.loads(model_failure(error).body()))
            finally:
                leave()
                await chunks.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models() -> Response:
        model = {"id": chat.name, "object": "model", "created": created, "owned_by": "slmkit"}
        return openai_answer(200, {"object": "list", "data": [model]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(rest: str) -> Response:
        return openai_error(OpenAIError(404, f"/v1/{rest} is not served here: use {CHAT_ROUTE} or /v1/models", None,
                                        "unknown_url"))  # fmt: skip

    return Front(app, metrics, max_body_bytes)


async def _prepend(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for item in rest:
        yield item


def app_from_environment() -> Any:
    """The app uvicorn's workers build (`slmkit.serve` sets the environment it reads)."""
    from slmkit.chat_models import load_chat_model
    from slmkit.serve import MAX_BODY_ENV, MAX_IN_FLIGHT_ENV, MODEL_PATH_ENV

    chat = load_chat_model(os.environ[MODEL_PATH_ENV])
    return build_app(chat, int(os.environ[MAX_BODY_ENV]), int(os.environ[MAX_IN_FLIGHT_ENV]))
