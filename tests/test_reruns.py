"""`main` reruns through the step cache: reuse, resume after a failure, force, and two at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from slmkit.pipeline import CACHE_KEY_TAG, ORDER, STEP_TAG
from tests.conftest import (
    E2E_REGISTERED,
    TRAINED_ROWS,
    UNTRAINED_EXPERIMENT,
    PipelineRun,
    TrackingServer,
    mlflow_run,
    mlflow_run_command,
    project_params,
    run_main,
    runs_of,
)

pytestmark = pytest.mark.integration


def cache_notes(parent: Run) -> dict[str, str]:
    """'ran' or 'reused' per step, from the main run's `cache.<step>` tags."""
    return {step: parent.data.tags[f"cache.{step}"].split(" ")[0] for step in ORDER}


def test_second_main_reuses_all_four_steps(
    pipeline_run: PipelineRun, tracking_server: TrackingServer, trained_tiny_phi3: Path
):
    versions_before = len(MlflowClient().search_model_versions("name='e2e-onnx'"))
    again = run_main(
        tracking_server,
        "e2e-tiny",
        f"model={trained_tiny_phi3}",
        f"max_rows={TRAINED_ROWS}",
        "max_tokens=8",
        *E2E_REGISTERED,
    )
    assert cache_notes(again.parent) == dict.fromkeys(ORDER, "reused")
    for step in ORDER:
        assert again.parent.data.params[f"{step}_run_id"] == pipeline_run.parent.data.params[f"{step}_run_id"]
    assert "reused run" in again.output
    assert len(MlflowClient().search_model_versions("name='e2e-onnx'")) == versions_before


def test_failed_step_is_rerun_alone_after_the_fix_and_stays_failed(tracking_server: TrackingServer, tiny_phi3: Path):
    params = (
        f"model={tiny_phi3}",
        "max_rows=2",
        "max_tokens=4",
        "pipeline_registered_model=",
        "onnx_registered_model=",
    )
    runs_before = len(runs_of(UNTRAINED_EXPERIMENT))
    broken = mlflow_run(
        tracking_server,
        "--experiment-name",
        UNTRAINED_EXPERIMENT,
        "-P",
        "eval_set=data/no-such-set.jsonl",
        *[a for p in params for a in ("-P", p)],
    )
    assert broken.returncode != 0
    new_runs = runs_of(UNTRAINED_EXPERIMENT)[runs_before:]
    failed = [r for r in new_runs if r.data.tags.get("mlflow.project.entryPoint") == "evaluate"]
    assert [r.info.status for r in failed] == ["FAILED"]

    fixed = run_main(tracking_server, UNTRAINED_EXPERIMENT, *params)
    assert cache_notes(fixed.parent) == {
        "download": "reused",
        "log_pipeline": "reused",
        "log_onnx_wrapper": "reused",
        "evaluate": "ran",
    }
    assert MlflowClient().get_run(failed[0].info.run_id).info.status == "FAILED"

    forced = run_main(tracking_server, UNTRAINED_EXPERIMENT, *params, "force=evaluate")
    assert cache_notes(forced.parent) == {
        "download": "reused",
        "log_pipeline": "reused",
        "log_onnx_wrapper": "reused",
        "evaluate": "ran",
    }
    assert "forced" in forced.parent.data.tags["cache.evaluate"]
    assert forced.parent.data.params["evaluate_run_id"] != fixed.parent.data.params["evaluate_run_id"]


def test_two_mains_at_once_do_each_step_once_and_register_once(
    tracking_server: TrackingServer, tiny_phi3: Path, tmp_path: Path
):
    params = [
        f"model={tiny_phi3}",
        "max_rows=2",
        "max_tokens=4",
        "pipeline_registered_model=",
        "onnx_registered_model=concurrent-onnx",
    ]
    command = mlflow_run_command("--experiment-name", "concurrent", *project_params(*params))
    env = tracking_server.env(SLMKIT_LOCK_DIR=str(tmp_path / "locks"))
    # Two `mlflow run --experiment-name` racing to create the same experiment is MLflow's own
    # race (one gets RESOURCE_ALREADY_EXISTS); scheduled runs log to an existing experiment.
    mlflow.create_experiment("concurrent")
    both = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in both]
    assert [process.returncode for process in both] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    runs = runs_of("concurrent")
    parents = [r for r in runs if r.data.tags.get(STEP_TAG) == "main"]
    assert len(parents) == 2
    for step in ORDER:
        keyed = [r for r in runs if r.data.tags.get(STEP_TAG) == step and CACHE_KEY_TAG in r.data.tags]
        assert len(keyed) == 1, step
        assert {p.data.params[f"{step}_run_id"] for p in parents} == {keyed[0].info.run_id}
    assert sorted(cache_notes(p)["evaluate"] for p in parents) == ["ran", "reused"]
    assert len(MlflowClient().search_model_versions("name='concurrent-onnx'")) == 1
