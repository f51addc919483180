"""Each step runs from its own copy of the project, in its own folder, and the copy the earlier
step ran from is deleted first: steps share nothing but the tracking server, as on Databricks.
The copies are plain folders, not git checkouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slmkit import PROJECT_ROOT
from slmkit.pipeline import MODEL_URI_TAG, STEP_TAG
from tests.conftest import TrackingServer, mlflow_run, project_params, runs_of

pytestmark = pytest.mark.integration

IGNORED = shutil.ignore_patterns(
    ".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "__pycache__", ".*_cache", "logs"
)


def run_from_own_copy(server: TrackingServer, tmp_path: Path, step: str, *params: str) -> dict[str, str]:
    """Run `step` from a fresh copy of the project, delete the copy, return the run's tags."""
    copy = Path(shutil.copytree(PROJECT_ROOT, tmp_path / step, ignore=IGNORED))
    result = mlflow_run(server, "-e", step, "--experiment-name", "isolated", *project_params(*params), project=copy)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(copy)
    run = [r for r in runs_of("isolated") if r.data.tags.get(STEP_TAG) == step][-1]
    assert run.info.status == "FINISHED"
    return {"run_id": run.info.run_id, **run.data.tags}


def test_steps_chain_through_the_tracking_server_alone(
    tracking_server: TrackingServer, tiny_phi3: Path, tmp_path: Path
):
    download = run_from_own_copy(tracking_server, tmp_path, "download", f"model={tiny_phi3}")
    pipeline = run_from_own_copy(tracking_server, tmp_path, "log_pipeline", f"download_run_id={download['run_id']}")
    onnx = run_from_own_copy(
        tracking_server, tmp_path, "log_onnx_wrapper", f"download_run_id={download['run_id']}", "model="
    )
    evaluation = run_from_own_copy(
        tracking_server, tmp_path, "evaluate",
        f"pipeline_model_uri={pipeline[MODEL_URI_TAG]}", f"onnx_model_uri={onnx[MODEL_URI_TAG]}",
        "max_rows=2", "max_tokens=4", "pipeline_registered_model=", "onnx_registered_model=",
    )  # fmt: skip
    assert evaluation["slmkit.step"] == "evaluate"
    assert not any(tmp_path.iterdir())
