"""`mlflow run --env-manager uv` builds a step's environment from conda.yaml, the project's one
pinned environment, and the step runs in it. With a cold uv cache the install takes about 29 s
on 2 cores, 8 s given pyspark's wheel (docs/development.md); MLflow keeps environments under
~/.mlflow/envs, this test in its own root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit.environment import read_pins
from slmkit.workflow.steps import STEP_TAG
from tests.conftest import TrackingServer, mlflow_run_command, runs_of

pytestmark = pytest.mark.integration


@pytest.mark.slow(seconds=40)
def test_a_step_runs_in_the_uv_environment_built_from_conda_yaml(
    tracking_server: TrackingServer, tiny_phi3: Path, tmp_path: Path
):
    command = mlflow_run_command("-e", "download", "--experiment-name", "uv", "-P", f"model={tiny_phi3}")
    command[command.index("local")] = "uv"
    # A fresh environment root and uv cache: the environment is built here, from conda.yaml, not
    # taken from a cache. Both (2 GB) go when the test ends, passed or failed: left until the
    # session ends, they filled a CI machine's disk.
    env = tracking_server.env(
        MLFLOW_ENV_ROOT=str(tmp_path / "envs"),
        UV_CACHE_DIR=str(tmp_path / "uv-cache"),
        UV_FIND_LINKS=",".join(wheel_folders(tmp_path / "wheels")),
    )
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        [run] = [r for r in runs_of("uv") if r.data.tags.get(STEP_TAG) == "download"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.project.env"] == "uv"
        assert run.data.params["model_name"] == "tiny-phi3"
        [environment] = (tmp_path / "envs").iterdir()
        python = environment / "bin" / "python"
        # mlflow's version from its metadata: the step above imported it in that environment, and
        # importing it again costs ~4 s of CPU. transformers, which the download of a folder does
        # not import, is imported.
        check = "import transformers; from importlib.metadata import version; print(version('mlflow'), transformers.__version__)"
        installed = subprocess.run(
            [str(python), "-c", check],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        pins = read_pins()
        assert [f"mlflow=={installed[0]}", f"transformers=={installed[1]}"] == [pins["mlflow"], pins["transformers"]]
    finally:
        for built in ("envs", "uv-cache", "wheels"):
            shutil.rmtree(tmp_path / built, ignore_errors=True)


def wheel_folders(scratch: Path) -> list[str]:
    """Where uv finds wheels beyond the index, as pip finds them for .venv.

    - This machine's pip find-links, where pip finds the local CPU torch wheel: PyPI's default
      torch for Linux is a multi-GB CUDA build.
    - The pinned pyspark, which the index has only as an sdist, as the wheel pip built from it
      for .venv (from pip's cache: under a second). uv would build it again from the sdist,
      ~28 s of CPU here, for the same pinned files.
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", read_pins()["pyspark"], "--wheel-dir", str(scratch)],
        check=True, capture_output=True,
    )  # fmt: skip
    return [*filter(None, os.environ.get("PIP_FIND_LINKS", "").split()), str(scratch)]
