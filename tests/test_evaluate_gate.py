"""`evaluate` decides: dataset input, per-model scores, plots, report, registry and the gate.

The champion is the tiny Phi-3 trained to answer the first eval rows; the worse candidate is an
untrained tiny Phi-3, so its lower quality is measured, not faked.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion

from slmkit.errors import UserError
from slmkit.evaluation.promotion import CANDIDATE, CHAMPION, GatePolicy, check_registered_name, decide
from tests.conftest import (
    E2E_NAMES,
    TRAINED_EXPERIMENT,
    TRAINED_ROWS,
    ConcurrentMains,
    PipelineRun,
    runs_of,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_gate_passes_on_floor_and_without_champion():
    decision = decide(
        {"answer_correct_rate": 0.6, "token_f1_mean": 0.5}, None, {"exact_match_rate": 0.9}, GatePolicy(0.5, 0.05, 0.8)
    )
    assert decision.passed
    assert decision.reasons == (
        "ok answer_correct_rate 0.600 vs floor 0.500",
        "ok no champion yet",
        "ok parity exact_match_rate 0.900 vs floor 0.800",
    )


def test_gate_fails_on_regression_beyond_tolerance_and_names_it():
    champion = {"answer_correct_rate": 0.8, "token_f1_mean": 0.7}
    decision = decide({"answer_correct_rate": 0.76, "token_f1_mean": 0.5}, champion, None, GatePolicy(0.0, 0.05))
    assert not decision.passed
    assert "ok answer_correct_rate 0.760 vs champion 0.800 (tolerance 0.050)" in decision.reasons
    assert "FAIL token_f1_mean 0.500 vs champion 0.700 (tolerance 0.050)" in decision.reasons


def test_gate_fails_below_quality_floor_and_parity_floor():
    decision = decide(
        {"answer_correct_rate": 0.1, "token_f1_mean": 0.1}, None, {"exact_match_rate": 0.2}, GatePolicy(0.5, 0.05, 0.5)
    )
    assert not decision.passed
    assert [r.split()[0] for r in decision.reasons] == ["FAIL", "ok", "FAIL"]


@pytest.mark.parametrize("name", ["slm-chat", "main.models.slm_chat", ""])
def test_workspace_and_unity_catalog_names_are_accepted(name: str):
    assert check_registered_name(name, "onnx_registered_model") == name


@pytest.mark.parametrize("name", ["../evil", "a b", "a.b.c.d", "x/y"])
def test_unsafe_registered_names_are_refused(name: str):
    with pytest.raises(UserError, match="onnx_registered_model="):
        check_registered_name(name, "onnx_registered_model")


integration = pytest.mark.integration


@integration
def test_eval_set_is_logged_as_dataset_input(pipeline_run: PipelineRun):
    inputs = pipeline_run.children["evaluate"].inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == "eval_set"
    assert inputs[0].tags[0].value == "evaluation"


@integration
def test_quality_is_logged_once_and_each_row_keeps_its_scored_trace(pipeline_run: PipelineRun):
    evaluate = pipeline_run.children["evaluate"]
    metrics = evaluate.data.metrics
    for model in ("pipeline", "onnx"):
        for key in (
            "answer_correct_rate",
            "token_f1_mean",
            "well_formed_rate",
            "peak_rss_bytes",
            "model_size_bytes",
            "latency_p95_s",
            "prompt_tokens_per_s_median",
        ):
            assert f"{model}/{key}" in metrics, f"{model}/{key}"
        # The trained rows are answered correctly by both models.
        assert metrics[f"{model}/answer_correct_rate"] == 1.0
        assert not [key for key in metrics if key.endswith("/mean")]  # genai.evaluate's own copies stay out
    assert metrics["parity/exact_match_rate"] == 1.0
    scored = [r for r in runs_of(TRAINED_EXPERIMENT) if r.data.tags.get("mlflow.parentRunId") == evaluate.info.run_id]
    assert sorted(r.info.run_name for r in scored) == ["evaluate · onnx", "evaluate · pipeline"]
    traces = mlflow.search_traces(
        locations=[evaluate.info.experiment_id], run_id=scored[0].info.run_id, return_type="list"
    )
    assert len(traces) == TRAINED_ROWS
    assert [a.value for t in traces for a in t.info.assessments if a.name == "answer_correct"] == [True] * TRAINED_ROWS


@integration
def test_plots_are_png_and_report_has_the_table(pipeline_run: PipelineRun, tmp_path: Path):
    run_id = pipeline_run.children["evaluate"].info.run_id
    for plot in ("plots/latency.png", "plots/overview.png"):
        data = Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=plot, dst_path=str(tmp_path))
        ).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5000
    report = Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="comparison.md", dst_path=str(tmp_path))
    ).read_text()
    assert "| answer correct rate | 1.000 | 1.000 |" in report
    assert "## Promotion gate" in report
    assert "| answer correct rate | 1.000 | 1.000 |" in pipeline_run.output


def version_logged_by(name: str, run: Run) -> ModelVersion:
    """The version of registered model `name` whose model `run` logged, with its aliases (which
    search_model_versions leaves out)."""
    client = MlflowClient()
    [found] = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run.info.run_id]
    return client.get_model_version(name, found.version)


@integration
def test_first_run_registers_both_with_candidate_and_champion(pipeline_run: PipelineRun):
    client = MlflowClient()
    for name, step in zip(E2E_NAMES, ("log_pipeline", "log_onnx_wrapper"), strict=True):
        first = version_logged_by(name, pipeline_run.children[step])
        assert first.version == "1"
        assert client.get_model_version_by_alias(name, CHAMPION).version == first.version
        # `candidate` marks the newest registration: this one, until a later run registers.
        newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        assert client.get_model_version_by_alias(name, CANDIDATE).version == str(newest)
        assert first.tags["eval.answer_correct_rate"] == "1"
        assert first.tags["resolved_revision"].startswith("sha256:")
        assert len(first.tags["manifest_sha256"]) == 64
        assert first.tags["download_run_id"] == pipeline_run.children["download"].info.run_id
    assert pipeline_run.children["evaluate"].data.tags["gate.onnx.passed"] == "true"


@integration
def test_worse_candidate_leaves_champion_and_records_why(pipeline_run: PipelineRun, untrained_mains: ConcurrentMains):
    """The untrained tiny Phi-3 after the trained one: registered as candidate, kept from champion."""
    client = MlflowClient()
    [evaluate_run_id] = untrained_mains.used("evaluate")
    evaluate = client.get_run(evaluate_run_id)
    tags = evaluate.data.tags
    assert evaluate.info.status == "FINISHED"  # a failed gate is not a failed run
    assert tags["gate.onnx.passed"] == "false"
    assert "FAIL answer_correct_rate 0.000 vs champion 1.000" in tags["gate.onnx"]
    champion = version_logged_by("e2e-onnx", pipeline_run.children["log_onnx_wrapper"]).version
    assert client.get_model_version_by_alias("e2e-onnx", CHAMPION).version == champion
    [onnx_run_id] = untrained_mains.used("log_onnx_wrapper")
    worse = version_logged_by("e2e-onnx", client.get_run(onnx_run_id))
    assert CANDIDATE in worse.aliases
    assert CHAMPION not in worse.aliases
    assert "promotion gate" in untrained_mains.output_of(evaluate_run_id)
