"""The tracking server as every step depends on it: a lost server fails a step in seconds with
its URI, not after minutes of retries, and `main` rerun after a restart resumes.

MLflow retries a refused connection 7 times with doubling waits: a step whose server was stopped
hung for about 4 minutes here, then died with a traceback. Steps keep a user's own
MLFLOW_HTTP_REQUEST_* settings, and otherwise retry 3 times, 1, 2 and 4 s apart, which still
rides out a server restart of a few seconds.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping

from slmkit.errors import UserError

BOUNDED_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# mlflow.genai.evaluate scores in up to 10 threads while the async trace exporter writes with 10
# more, and the embedded SQLite store's connection pool holds 5 + 10: `make run` lost 6 of 48
# per-row traces (QueuePool limit reached), one more lost its assessments, and scoring stalled
# twice for 30 s. Two of each keep every write inside the pool; SQLite writes one at a time anyway.
BOUNDED_TRACE_WRITERS = {"MLFLOW_GENAI_EVAL_MAX_WORKERS": "2", "MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "2"}
# A served model writes a trace a request. With 10 writers, a trace's record and its spans are
# written in parallel, and where the record lands first MLflow writes the whole trace again, as an
# artifact file (71 of 355 traces in a run of the serving tests). And writers' time comes out of
# decoding (the GIL, which decode steps hold, and the cores they use). One writer writes each
# trace once, in order, and served 4.6% more tokens a second at 1 client (SQLite store).
SERVING_TRACE_WRITERS = {"MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "1"}
HEALTH_TIMEOUT_S = 5.0


class TrackingServerUnreachable(UserError):
    """The tracking server stopped answering; the run cannot even be marked FAILED."""


def bound_tracking_retries() -> None:
    """Apply BOUNDED_RETRIES where the user set nothing; child steps inherit them."""
    for name, value in BOUNDED_RETRIES.items():
        os.environ.setdefault(name, value)


def bound_trace_writers(bounds: Mapping[str, str] = BOUNDED_TRACE_WRITERS) -> None:
    """Apply `bounds` (BOUNDED_TRACE_WRITERS or SERVING_TRACE_WRITERS) where the user set nothing."""
    for name, value in bounds.items():
        os.environ.setdefault(name, value)


def tracking_server_problem(tracking_uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> str | None:
    """Why an HTTP tracking server does not answer its /health endpoint, or None if it does.

    Other URIs (a local SQLite file, `databricks`) have nothing to probe and report None.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read()
    except OSError as error:
        return str(getattr(error, "reason", None) or error)
    return None


def unreachable(tracking_uri: str, problem: str) -> TrackingServerUnreachable:
    """The error to raise, after telling MLflow to spend no more time on this server: the run's
    end status and the exit handlers would otherwise retry for minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"
    return TrackingServerUnreachable(
        f"the tracking server at {tracking_uri} does not answer ({problem}); start it again and rerun: "
        "`mlflow run .` reuses every step that finished, and nothing it logged is lost"
    )


def lost_tracking_server() -> TrackingServerUnreachable | None:
    """The error for the current tracking server if it does not answer, else None."""
    import mlflow

    tracking_uri = mlflow.get_tracking_uri()
    problem = tracking_server_problem(tracking_uri)
    return unreachable(tracking_uri, problem) if problem else None


def require_tracking_server() -> None:
    """Fail now, naming the URI, if the tracking server does not answer."""
    if error := lost_tracking_server():
        raise error
