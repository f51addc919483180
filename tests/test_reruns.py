"""`main` reruns through the step cache: reuse, and two at once (resume after a failure and force:
tests/test_reliability.py, in one chain with the lost tracking server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from slmkit.workflow.steps import CACHE_KEY_TAG, ORDER, STEP_TAG
from tests.conftest import (
    E2E_REGISTERED,
    TRAINED_EXPERIMENT,
    TRAINED_ROWS,
    ConcurrentMains,
    PipelineRun,
    TrackingServer,
    cache_notes,
    run_main_module,
)

pytestmark = pytest.mark.integration


def test_second_main_reuses_all_four_steps(
    pipeline_run: PipelineRun, tracking_server: TrackingServer, trained_tiny_phi3: Path
):
    versions_before = len(MlflowClient().search_model_versions("name='e2e-onnx'"))
    again = run_main_module(
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
