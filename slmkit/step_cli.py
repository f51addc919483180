"""The command-line frame every step shares: logging set up, user errors as one clean line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from slmkit.errors import UserError


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse the arguments and call `main`; a UserError exits 2 with `error: <message>`.

    The MLflow run, opened by `main` with `mlflow.start_run()`, ends FAILED because the error
    leaves its `with` block; `mlflow run` then sees the non-zero exit as well.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args()
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 - the CLI's one-line error
        sys.exit(2)


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
