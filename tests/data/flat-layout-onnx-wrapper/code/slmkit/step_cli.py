"""The command-line frame every step shares: logging set up, user errors as one clean line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from slmkit.errors import UserError
from slmkit.tracking_server import bound_tracking_retries, lost_tracking_server


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse the arguments and call `main`; a UserError exits 2 with `error: <message>`.

    The MLflow run, opened by `main` with `mlflow.start_run()`, ends FAILED because the error
    leaves its `with` block; `mlflow run` then sees the non-zero exit as well. SIGTERM (a
    scheduler stopping the job, `mlflow run` cancelling its child) ends the run the same way.
    A step whose tracking server stops answering exits 2 naming the URI, after bounded retries
    (slmkit.tracking_server); its run stays RUNNING on the server, which cannot be told.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    bound_tracking_retries()
    args = parser.parse_args()
    try:
        main(args)
    except Exception as error:  # anything but a UserError or a lost server is re-raised below
        # A step that failed because its tracking server went away says so, not with a traceback,
        # also where the failed call was wrapped in a UserError (a child step that could not start).
        user_error = lost_tracking_server() or _user_error_in(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)  # noqa: T201 - the CLI's one-line error
        sys.exit(2)


def _user_error_in(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, also when ending the run raised another on the way out."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """Unwind like an error, so the run ends FAILED and scratch folders are removed."""
    print("error: stopped by SIGTERM; the run is marked FAILED", file=sys.stderr)  # noqa: T201
    sys.exit(128 + signum)


def positive_int(name: str, value: int) -> int:
    """Refuse zero or negative sizes with the parameter's name."""
    if value < 1:
        raise UserError(f"{name}={value}: must be at least 1")
    return value


def parse_bool(name: str, value: str) -> bool:
    """MLproject has no boolean type: accept exactly `true` or `false`, refuse anything else."""
    if value not in ("true", "false"):
        raise UserError(f"{name}={value!r}: use true or false")
    return value == "true"
