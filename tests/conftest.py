"""Shared fixtures: tiny models built once per session, and a real MLflow tracking server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests

from slmkit import PROJECT_ROOT
from tests.tiny_models import build_tiny_phi3

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a user's shell would have: venv first on PATH, this server's URI."""
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": self.uri,
            "HF_HUB_OFFLINE": "1",
            **extra,
        }


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """`mlflow server` on 127.0.0.1: SQLite backend, artifacts served through the server."""
    root = tmp_path_factory.mktemp("tracking")
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout_s=60)
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        yield TrackingServer(uri=f"http://127.0.0.1:{port}", root=root)
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Phi-3 checkpoint folder, built once per session."""
    return build_tiny_phi3(tmp_path_factory.mktemp("models") / "tiny-phi3")


def mlflow_run(server: TrackingServer, *args: str, timeout_s: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`mlflow run` of this project, as a user types it, against `server`."""
    command = [str(BIN / "mlflow"), "run", str(PROJECT_ROOT), "--env-manager", "local", *args]
    return subprocess.run(
        command, env=server.env(**env), capture_output=True, text=True, timeout=timeout_s, check=False
    )
