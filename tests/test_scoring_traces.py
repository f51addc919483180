"""Every eval row of every model keeps its trace and all its assessments in the embedded SQLite
store that `make run` uses, with no warning from MLflow's tracing (real mlflow.genai.evaluate)."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest

from slmkit import PROJECT_ROOT
from slmkit.evaluation.scorers import SCORERS, record_scores
from slmkit.evaluation.scoring import RowResult, answer_correct
from slmkit.sources.eval_set import load_eval_set
from tests.conftest import use_experiment


@pytest.fixture
def sqlite_store(tmp_path: Path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    use_experiment(mlflow.create_experiment("scores", artifact_location=str(tmp_path / "artifacts")))
    yield
    mlflow.set_tracking_uri(previous)


def answers(rows, text: str) -> list[RowResult]:
    return [RowResult(row.row_id, text, "stop", False, 0.0, True, 0.1, 0.01, 10, 5) for row in rows]


def test_both_models_keep_a_trace_with_every_assessment_per_row_and_tracing_warns_nothing(
    sqlite_store, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
):
    rows = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl")
    assert len(rows) == 24
    caplog.set_level(logging.WARNING)
    texts = {"pipeline": "Paris", "onnx": "Tokyo"}
    with mlflow.start_run() as parent:
        for name, text in texts.items():
            record_scores(name, rows, answers(rows, text))
    assert mlflow.get_run(parent.info.run_id).data.metrics == {}  # the step logs its own metrics, once
    scoring_runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )
    assert sorted(run.info.run_name for run in scoring_runs) == ["evaluate · onnx", "evaluate · pipeline"]
    for run in scoring_runs:
        traces = mlflow.search_traces(run_id=run.info.run_id, return_type="list", max_results=100)
        assert len(traces) == len(rows), run.info.run_name
        for trace in traces:
            assert {a.name for a in trace.info.assessments} >= {s.name for s in SCORERS}, trace.info.trace_id
        correct = [a.value for t in traces for a in t.info.assessments if a.name == "answer_correct"]
        text = texts[run.info.run_name.split(" · ")[1]]
        assert sum(map(bool, correct)) == sum(answer_correct(text, row.answers) for row in rows) == 1
    tracing_warnings = [r.getMessage() for r in caplog.records if "trace" in r.getMessage().lower()]
    assert tracing_warnings == []
    assert "Failed to" not in capfd.readouterr().err
