"""ASGI middleware around the whole app: the body limit, the metrics of every request, and OpenAI's
shape for MLflow's plain-text 504 on `/v1/…`.

An oversized body is read to its end and thrown away before the 413 goes out. Answered while the
client is still sending, uvicorn closes the connection after the answer whenever it will not be
kept alive (`Connection: close`, which urllib and many clients send), and the client sees the
reset instead of the 413. The discarding is bounded (DISCARD_MAX_BYTES, DISCARD_MAX_SECONDS), so
an endless or stalled sender costs at most that before it gets its 413 and the close.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mlflow.exceptions import MlflowException

from slmkit.serving.metrics import ServingMetrics
from slmkit.serving.protocol import CHAT_ROUTE, TIMEOUT, OpenAIError

# How much of an oversized body is read and thrown away, at most, so that the client reads its 413.
DISCARD_MAX_BYTES = 64 * 2**20
DISCARD_MAX_SECONDS = 10.0
# Routes counted by their own path in the metrics; every other path is counted as "other".
ROUTES = ("/invocations", CHAT_ROUTE, "/v1/models", "/metrics", "/ping", "/health", "/version")


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
                await discard_body(receive)
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
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                if more:
                    await discard_body(receive)
                return await answer(self._too_large(path))
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def receive_replayed() -> dict[str, Any]:
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send_counted)


async def discard_body(receive: Any) -> None:
    """Read the request's body to its end and drop it, for at most DISCARD_MAX_BYTES and
    DISCARD_MAX_SECONDS; returns early when the client leaves."""

    async def drain() -> None:
        discarded = 0
        while discarded <= DISCARD_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drain(), DISCARD_MAX_SECONDS)
    except TimeoutError:
        return
