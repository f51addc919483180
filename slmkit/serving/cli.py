"""`python -m slmkit.serve -m <model URI>`: serve either chat model with an OpenAI route.

The flags and defaults are `mlflow models serve`'s (`-m`, `-h`, `-p`, `-w`, `-t`), and the app
is MLflow's scoring app with `/v1/chat/completions`, `/v1/models` and `/metrics` added (see
`slmkit.serving.app`). It serves in the current environment, as `--env-manager local` does. The
model is fetched once (any URI MLflow resolves) before uvicorn starts its workers, into a
scratch folder that is removed when the server stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

import uvicorn
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

from slmkit.errors import UserError
from slmkit.serving.settings import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_BODY_ENV,
    MAX_IN_FLIGHT_ENV,
    MODEL_PATH_ENV,
)
from slmkit.workflow.cli import positive_int
from slmkit.workflow.tracking_server import SERVING_TRACE_WRITERS, bound_trace_writers


def build_parser() -> argparse.ArgumentParser:
    # -h is the host, as in `mlflow models serve`: help is --help only.
    parser = argparse.ArgumentParser(prog="python -m slmkit.serve", description=__doc__, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("-m", "--model-uri", required=True, help="models:/name@alias, runs:/…, or a local path")
    parser.add_argument("-h", "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=5000, help="port (default: 5000)")
    parser.add_argument("-w", "--workers", type=int, default=int(os.environ.get("MLFLOW_MODELS_WORKERS", "1")),
                        help="uvicorn workers, each with its own copy of the model (default: 1)")  # fmt: skip
    parser.add_argument("-t", "--timeout", type=int, default=MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get(),
                        help="seconds before a request is answered 504 (default: 60)")  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get a 413 (default: {DEFAULT_MAX_BODY_BYTES})")  # fmt: skip
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                        help=f"chat requests per worker past which new ones get a 503 (default: {DEFAULT_MAX_IN_FLIGHT})")  # fmt: skip
    return parser


def local_model(model_uri: str, scratch: Path) -> Path:
    """A local folder holding the model: the path itself, or MLflow's download of the URI into
    `scratch` (left to MLflow, the download would stay in /tmp after the server stops)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if Path(model_uri).is_dir():
        return Path(model_uri).resolve()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(scratch)))
    except MlflowException as error:
        raise UserError(f"cannot fetch the model {model_uri}: {error.message}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("workers", "timeout", "max_body_bytes", "max_in_flight"):
        positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    # uvicorn stops on SIGTERM, then raises the signal again to the handler it found: made an
    # exit here, so the scratch folder below is removed instead of left behind in /tmp.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="slmkit-serve-") as scratch:
        os.environ.update(
            {
                MODEL_PATH_ENV: str(local_model(args.model_uri, Path(scratch))),
                MAX_BODY_ENV: str(args.max_body_bytes),
                MAX_IN_FLIGHT_ENV: str(args.max_in_flight),
                MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name: str(args.timeout),
            }
        )
        bound_trace_writers(SERVING_TRACE_WRITERS)
        if args.workers > 1:  # every worker writes its metrics here; /metrics sums them
            metrics_dir = Path(scratch) / "metrics"
            metrics_dir.mkdir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        # In this process, so a SIGTERM reaches uvicorn's own handling (workers stop with it).
        uvicorn.run(
            "slmkit.serving.app:app_from_environment",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
        )
    return 0


def run() -> None:
    """`main` as a command: a UserError is one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 - the CLI's one-line error
        sys.exit(2)
