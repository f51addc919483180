"""Each step runs as a Databricks task would: `databricks/run_step.py` with the flags the bundle's
job file gives it, from its own copy of the project, in that copy's `databricks/` folder, and the
copy the earlier step ran from is deleted first. Steps share nothing but the tracking server,
and each records its own params, cache key and lineage, with no `mlflow run` around it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from slmkit import PROJECT_ROOT
from slmkit.workflow.steps import CACHE_KEY_TAG, MODEL_URI_TAG, STEP_TAG, STEPS
from tests.conftest import TrackingServer, runs_of

pytestmark = pytest.mark.integration

IGNORED = shutil.ignore_patterns(
    ".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "__pycache__", ".*_cache", "logs"
)
JOB = yaml.safe_load((PROJECT_ROOT / "resources" / "slm_chat_job.yml").read_text())["resources"]["jobs"][
    "slm_chat_pipeline"
]
REFERENCE = re.compile(r"\{\{(?:job\.parameters|tasks\.\w+\.values)\.(\w+)\}\}")
EXPERIMENT = "isolated"


def task_flags(step: str, values: dict[str, str]) -> list[str]:
    """The task's flags from the job file, each `{{job.parameters.x}}` and `{{tasks.….values.x}}` filled."""
    [task] = [t for t in JOB["tasks"] if t["task_key"] == step]
    return [REFERENCE.sub(lambda m: values[m.group(1)], str(f)) for f in task["spark_python_task"]["parameters"]]


def run_task(server: TrackingServer, tmp_path: Path, step: str, values: dict[str, str]) -> mlflow.entities.Run:
    """Run one task from a fresh copy of the project, delete the copy, return the step's run."""
    copy = Path(shutil.copytree(PROJECT_ROOT, tmp_path / step, ignore=IGNORED))
    result = subprocess.run(
        [sys.executable, str(copy / "databricks" / "run_step.py"), *task_flags(step, values)],
        cwd=copy / "databricks",
        env=server.env(MLFLOW_EXPERIMENT_NAME=EXPERIMENT),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(copy)
    [run] = [r for r in runs_of(EXPERIMENT) if r.data.tags.get(STEP_TAG) == step]
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.slow(seconds=40)
def test_bundle_tasks_chain_through_the_tracking_server_and_record_their_own_params(
    tracking_server: TrackingServer, tiny_phi3: Path, tmp_path: Path
):
    values = {
        "model": str(tiny_phi3),
        "revision": "",
        "execution_provider": "cpu",
        "max_rows": "2",
        "max_tokens": "4",
        "pipeline_registered_model": "",
        "onnx_registered_model": "",
    }
    runs = {}
    for step in ("download", "log_pipeline", "log_onnx_wrapper", "evaluate"):
        runs[step] = run_task(tracking_server, tmp_path, step, values)
        values[STEPS[step].hands_on or "done"] = (
            runs[step].info.run_id if step == "download" else runs[step].data.tags.get(MODEL_URI_TAG, "")
        )
    assert not any(tmp_path.iterdir())
    for step, run in runs.items():
        assert set(run.data.params) >= {p.name for p in STEPS[step].params}, step
        assert len(run.data.tags[CACHE_KEY_TAG]) == 64
    assert runs["log_pipeline"].data.params["torch_dtype"] == "bfloat16"  # the task's own flag
    assert runs["evaluate"].data.params["max_rows"] == "2"
    model_name = runs["download"].data.params["model_name"]
    assert model_name == "tiny-phi3"
    assert runs["log_onnx_wrapper"].info.run_name == f"log_onnx_wrapper · {model_name}"
    onnx = mlflow.pyfunc.load_model(values["onnx_model_uri"], model_config={"tracing": "false"})
    answer = onnx.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert answer[0]["model"] == model_name
