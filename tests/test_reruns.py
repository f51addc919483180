"""`main` reruns through the step cache: reuse, resume after a failure, force, and two at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from slmkit.pipeline import CACHE_KEY_TAG, ORDER, STEP_TAG
from tests.conftest import (
    E2E_REGISTERED,
    TRAINED_EXPERIMENT,
    TRAINED_ROWS,
    UNTRAINED_EXPERIMENT,
    ConcurrentMains,
    PipelineRun,
    TrackingServer,
    mlflow_run,
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
        TRAINED_EXPERIMENT,
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


def test_two_mains_at_once_do_each_step_once_and_register_once(untrained_mains: ConcurrentMains):
    assert untrained_mains.returncodes == [0, 0], "\n".join(o[-2000:] for o in untrained_mains.outputs)
    parents = untrained_mains.parents
    assert len(parents) == 2
    for step in ORDER:
        # Both mains name one run per step, and no cache key was built twice meanwhile.
        assert len(untrained_mains.used(step)) == 1, step
        keys = [
            r.data.tags[CACHE_KEY_TAG]
            for r in untrained_mains.runs
            if r.data.tags.get(STEP_TAG) == step and CACHE_KEY_TAG in r.data.tags
        ]
        assert len(keys) <= 1, step
    # Nothing evaluated these rows before: one main evaluated, the other waited and took its run.
    assert sorted(cache_notes(p)["evaluate"] for p in parents) == ["ran", "reused"]
    assert untrained_mains.new_versions == {"e2e-pipeline": 1, "e2e-onnx": 1}
