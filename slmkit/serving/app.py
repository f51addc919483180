"""The app factory: MLflow's scoring app for a chat model, with the chat routes and the middleware.

`build_app` starts from the FastAPI app that `mlflow.pyfunc.scoring_server.init` builds, so
`/invocations`, `/ping`, `/health` and `/version` are MLflow's own, and adds (`slmkit.serving.routes`):

- `POST /v1/chat/completions`: the OpenAI Chat Completions API, with Server-Sent Events for
  `"stream": true` (MLflow's server cannot stream over HTTP: mlflow/mlflow#12439);
- `GET /v1/models`: the served model in OpenAI's list shape;
- `GET /metrics`: Prometheus text exposition;
- chat bodies on `/invocations`, answered through the same checks as `/v1/…`.

Bodies over `max_body_bytes` get a 413 on every route (`slmkit.serving.middleware`).
"""

from __future__ import annotations

import os
from typing import Any

from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

from slmkit.chat.adapters import ChatModel
from slmkit.serving.metrics import ServingMetrics
from slmkit.serving.middleware import Front
from slmkit.serving.routes import ChatService, router
from slmkit.serving.settings import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_BODY_ENV,
    MAX_IN_FLIGHT_ENV,
    MODEL_PATH_ENV,
)


def build_app(chat: ChatModel, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> Any:  # fmt: skip
    """MLflow's scoring app for the chat model's pyfunc model, with the chat routes added."""
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(chat.pyfunc_model)
    metrics = ServingMetrics()
    chat.observe_batches(metrics.batch_size.observe)
    mlflow_invocations = next(route for route in app.router.routes if getattr(route, "path", "") == "/invocations")
    app.router.routes.remove(mlflow_invocations)
    app.state.chat = service = ChatService(
        chat, metrics, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get(), max_in_flight, mlflow_invocations
    )
    chat.expect_requests(lambda: service.in_flight)
    app.include_router(router)
    return Front(app, metrics, max_body_bytes)


def app_from_environment() -> Any:
    """The app uvicorn's workers build (`slmkit.serving.cli` sets the environment it reads)."""
    from slmkit.chat.adapters import load_chat_model

    chat = load_chat_model(os.environ[MODEL_PATH_ENV])
    return build_app(chat, int(os.environ[MAX_BODY_ENV]), int(os.environ[MAX_IN_FLIGHT_ENV]))
