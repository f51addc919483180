"""One reuse rule: a step run alone finds its upstream by the cache key `main` uses, so it never
takes a newer upstream run made with other params or other code (the hole in MLflow's multistep
example, `_already_ran`), and reuses what `main` built when nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slmkit import PROJECT_ROOT
from slmkit.workflow.cache import StepRunner
from slmkit.workflow.steps import CACHE_KEY_TAG, STEP_TAG
from tests.conftest import TRAINED_EXPERIMENT, PipelineRun, TrackingServer, run_step_module, runs_of
from tests.test_step_isolation import IGNORED

pytestmark = pytest.mark.integration


def upstream_as_evaluate_alone_finds_it(pipeline_run: PipelineRun, model: Path) -> dict[str, str]:
    runner = StepRunner("local", pipeline_run.parent.info.experiment_id)
    values = runner.fill_inputs("evaluate", {"model": str(model)})
    return {"log_pipeline": values["pipeline_model_uri"], "log_onnx_wrapper": values["onnx_model_uri"]}


def test_evaluate_alone_reuses_mains_models_and_rebuilds_only_what_changed_code_touches(
    pipeline_run: PipelineRun, tracking_server: TrackingServer, trained_tiny_phi3: Path, tmp_path: Path
):
    built_by_main = {step: pipeline_run.model_uri(step) for step in ("log_pipeline", "log_onnx_wrapper")}
    runs_before = len(runs_of(TRAINED_EXPERIMENT))
    assert upstream_as_evaluate_alone_finds_it(pipeline_run, trained_tiny_phi3) == built_by_main
    assert len(runs_of(TRAINED_EXPERIMENT)) == runs_before  # nothing changed: nothing ran

    # The same project with one changed line in a file of log_onnx_wrapper's key.
    copy = Path(shutil.copytree(PROJECT_ROOT, tmp_path / "changed", ignore=IGNORED))
    wrapper = copy / "wrappers" / "onnx_chat_model.py"
    wrapper.write_text(wrapper.read_text() + "\n# a changed wrapper\n")
    # fidelity_positions=0: what is reused is the subject here, not the fidelity (pipeline_run's).
    params = (f"model={trained_tiny_phi3}", "max_rows=1", "max_tokens=4", "fidelity_positions=0")
    registered = ("pipeline_registered_model=", "onnx_registered_model=")
    result = run_step_module(tracking_server, TRAINED_EXPERIMENT, "evaluate", *params, *registered, project=copy)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(TRAINED_EXPERIMENT)
    evaluation = [r for r in runs if r.data.tags.get(STEP_TAG) == "evaluate"][-1]
    assert evaluation.data.params["pipeline_model_uri_used"] == built_by_main["log_pipeline"]
    assert evaluation.data.params["onnx_model_uri_used"] != built_by_main["log_onnx_wrapper"]
    assert not any(
        name.startswith("parity/fidelity") or name == "parity/top1_agreement" for name in evaluation.data.metrics
    )
    new_onnx = [r for r in runs if r.data.tags.get(STEP_TAG) == "log_onnx_wrapper"][-1]
    assert new_onnx.data.tags[CACHE_KEY_TAG] != pipeline_run.children["log_onnx_wrapper"].data.tags[CACHE_KEY_TAG]
    made = sorted(r.data.tags.get(STEP_TAG) for r in runs[runs_before:])
    assert made == ["evaluate", "evaluate.scores", "evaluate.scores", "log_onnx_wrapper"]

    # The newest ONNX model in the experiment is now the changed code's: this code does not take it.
    assert upstream_as_evaluate_alone_finds_it(pipeline_run, trained_tiny_phi3) == built_by_main
