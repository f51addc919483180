"""Local server processes for tests and benchmarks: a free port, waiting for readiness, stopping,
and a served chat model under `mlflow models serve` or `python -m slmkit.serve`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
# The two ways to serve a model: MLflow's own command, and ours with the OpenAI route.
MLFLOW_SERVE = "mlflow"
SLMKIT_SERVE = "slmkit"


@dataclass(frozen=True)
class ServedModel:
    """A running server process; `url` is its `/invocations`, `base` its root."""

    base: str
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"{self.base}/invocations"

    @property
    def chat_url(self) -> str:
        return f"{self.base}/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early, naming the exit code, if the process died.
    A refused connection costs about a millisecond, so the poll is fast: a server that is up
    is used within 0.1 s, not up to 0.5 s later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Terminate, and kill if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve_command(front: str, model: Path | str, port: int, *extra: str) -> list[str]:
    """The command line of `front` (MLFLOW_SERVE or SLMKIT_SERVE) serving `model` on `port`."""
    if front == MLFLOW_SERVE:
        command = [str(BIN / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local"]
    else:
        command = [sys.executable, "-m", "slmkit.serve", "-m", str(model)]
    return [*command, "-h", "127.0.0.1", "-p", str(port), *extra]


@contextmanager
def served(
    model: Path | str, env: dict[str, str], log: Path, *extra: str, timeout_s: float = 180, front: str = MLFLOW_SERVE
) -> Iterator[ServedModel]:
    """`model` served by `front` on a free port of 127.0.0.1, run from the log's folder (so
    traces and caches land there), stopped on exit; `extra` are more flags such as `-t 1`."""
    from slmkit import PROJECT_ROOT

    port = free_port()
    # The project on PYTHONPATH: `python -m slmkit.serve` runs from the log's folder.
    env = {**env, "PYTHONPATH": str(PROJECT_ROOT)} if front == SLMKIT_SERVE else env
    with log.open("w") as sink:
        command = serve_command(front, model, port, *extra)
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=log.parent)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", process, timeout_s)
            yield ServedModel(f"http://127.0.0.1:{port}", process, log)
        finally:
            stop_process(process)
