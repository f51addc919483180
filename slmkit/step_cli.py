"""The command-line frame every step shares: logging set up, user errors as one clean line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
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
        # A step that failed because its tracking server went away says so, not with a traceback.
        user_error = _user_error_in(error) or lost_tracking_server()
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


@dataclass(frozen=True)
class Option:
    """A step parameter declared once and shared by the steps that take or forward it.

    `name` is the MLproject parameter; the CLI flag is `--name-with-dashes`.
    """

    name: str
    type: Callable[[str], Any] = str
    default: Any = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    for option in options:
        parser.add_argument(option.flag, type=option.type, default=option.default)


def forward(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, str]:
    """The parsed values of `options` as `mlflow.projects.run` parameters for a child step."""
    return {option.name: str(getattr(args, option.name)) for option in options}


GENERATION_OPTIONS = (Option("temperature", float, 0.0), Option("max_new_tokens", int, 256))
QUANTIZATION_OPTIONS = (
    Option("quantization", str, ""),
    Option("calibration_set", str, "data/eval_set.jsonl"),
    Option("calibration_rows", int, 8),
    Option("max_quality_drop", float, 0.05),
)
EVALUATION_OPTIONS = (
    Option("eval_set", str, "data/eval_set.jsonl"),
    Option("max_rows", int, 0),
    Option("max_tokens", int, 64),
    Option("pipeline_registered_model", str, "slm-chat-pipeline"),
    Option("onnx_registered_model", str, "slm-chat-onnx"),
    Option("min_correct_rate", float, 0.0),
    Option("max_regression", float, 0.05),
    Option("min_parity", float, 0.0),
    Option("fail_on_gate", str, "false"),
)
