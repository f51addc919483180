"""`batch_infer` and `evaluate -P engine=spark` on a real local Spark session, on the tiny Phi-3.

One Spark session serves the module (it takes seconds to start); the step itself runs as a user
runs it, through `mlflow run`, which starts its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from slmkit import PROJECT_ROOT
from slmkit.evaluation import load_eval_set
from slmkit.pipeline import STEP_TAG
from slmkit.spark_batch import (
    LOCAL_DRIVER_JAVA_OPTIONS,
    answer_locally,
    answer_with_spark,
    read_spark,
    save_batch_model,
    spark_session,
)
from tests.conftest import BIN, TrackingServer, mlflow_run, project_params, runs_of

pytestmark = pytest.mark.integration

MAX_TOKENS = 8
EVAL_ROWS = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=6)
ROWS = [
    *({"id": f"eval-{i}", "messages": row.messages} for i, row in enumerate(EVAL_ROWS)),
    {"id": "own-budget", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 3},
    {"id": "unicode", "messages": [{"role": "user", "content": "Привет 👋 你好 — ça va?"}]},
    {"id": "bad-role", "messages": [{"role": "robot", "content": "Hi"}]},
    {"id": "overflow", "messages": [{"role": "user", "content": "Paris is big. " * 400}]},
]
ERRORS = {"bad-role": "messages[0].role must be one of", "overflow": "past the model's context of 512 tokens"}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def spark() -> Iterator:
    session = spark_session(partitions=2)
    yield session
    session.stop()


@pytest.fixture(scope="module", params=["onnx", "pipeline"])
def models(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A chat model folder and the batch model holding it."""
    model_dir = request.getfixturevalue("wrapper_dir" if request.param == "onnx" else "pipeline_dir")
    return model_dir, save_batch_model(str(model_dir), tmp_path_factory.mktemp(f"batch-{request.param}") / "model")


def in_process_answer(model: mlflow.pyfunc.PyFuncModel, row: dict) -> dict:
    request = {"messages": row["messages"], "max_tokens": row.get("max_tokens", MAX_TOKENS), "temperature": 0}
    return model.predict(request)[0]


def test_spark_answers_every_row_in_order_as_the_local_engine_and_predict_alone_do(spark, models, tmp_path: Path):
    """One Spark pass over two partitions per model: rows in equal rows out, in order, equal to
    the local engine's column for column, and each answer equal to the chat model's own."""
    model_dir, batch_dir = models
    source = write_jsonl(ROWS, tmp_path / "rows.jsonl")
    answered = answer_with_spark(spark, batch_dir, read_spark(spark, str(source)), 2, MAX_TOKENS).toPandas()
    assert list(answered["id"]) == [row["id"] for row in ROWS]
    local = answer_locally(mlflow.pyfunc.load_model(str(batch_dir)), pd.read_json(source, lines=True), MAX_TOKENS)
    columns = ["id", "answer", "finish_reason", "completion_tokens", "error"]
    assert answered[columns].astype(object).where(answered[columns].notna(), None).values.tolist() == (
        local[columns].astype(object).where(local[columns].notna(), None).values.tolist()
    )
    model = mlflow.pyfunc.load_model(str(model_dir))
    for row, out in zip(ROWS, answered.itertuples(), strict=True):
        if row["id"] in ERRORS:
            assert ERRORS[row["id"]] in out.error
            assert pd.isna(out.answer)
            assert pd.isna(out.completion_tokens)
            continue
        alone = in_process_answer(model, row)
        assert pd.isna(out.error)
        assert out.answer == alone["choices"][0]["message"]["content"], row["id"]
        assert out.completion_tokens == alone["usage"]["completion_tokens"]
        assert out.finish_reason == alone["choices"][0]["finish_reason"]
    unicode = answered[answered["id"] == "unicode"].iloc[0]
    assert unicode["messages"][0]["content"] == "Привет 👋 你好 — ça va?"
    assert answered.loc[answered["id"] == "eval-0", "answer"].item() == "Paris."  # the trained rows answer


def test_the_local_driver_jvm_runs_with_the_small_machine_options(spark):
    """The options reach the JVM itself: pyspark passes the session's conf to spark-submit,
    which starts the driver, only when the session starts the JVM."""
    runtime = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    assert set(LOCAL_DRIVER_JAVA_OPTIONS.split()) <= set(runtime.getInputArguments())


def test_batch_infer_runs_through_mlflow_run_and_logs_what_it_did(
    tracking_server: TrackingServer, wrapper_dir: Path, tmp_path: Path
):
    source, output = write_jsonl(ROWS, tmp_path / "rows.jsonl"), tmp_path / "answered"
    params = project_params(
        f"model_uri={wrapper_dir}", f"input={source}", f"output={output}", f"max_tokens={MAX_TOKENS}"
    )
    result = mlflow_run(tracking_server, "-e", "batch_infer", "--experiment-name", "batch", *params)
    assert result.returncode == 0, result.stderr[-3000:]
    written = pd.read_parquet(output)
    assert list(written["id"]) == [row["id"] for row in ROWS]
    assert written["error"].notna().sum() == len(ERRORS)
    [run] = runs_of("batch")
    assert run.data.metrics["rows"] == len(ROWS)
    assert run.data.metrics["rows_with_error"] == len(ERRORS)
    assert run.data.metrics["completion_tokens"] == written["completion_tokens"].sum()
    assert run.data.metrics["rows_per_s"] > 0
    assert run.data.tags["slmkit.output"] == str(output)
    assert run.data.params["engine"] == "spark"
    assert [d.dataset.name for d in run.inputs.dataset_inputs]  # the input, logged as a dataset
    # Rows are not traced: a trace per row of a large table would outweigh the answers.
    assert mlflow.search_traces(locations=[run.info.experiment_id], return_type="list") == []


def run_step(tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steps.batch_infer", *flags],
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", **env},
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_a_missing_input_is_one_line_naming_it(tmp_path: Path):
    result = run_step(tmp_path, "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: input={tmp_path / 'nope.jsonl'}: no such file or folder"
    assert not (tmp_path / "out").exists()


def test_without_java_spark_fails_in_one_line_and_says_how_to_install_it(tmp_path: Path, wrapper_dir: Path):
    source = write_jsonl(ROWS[:1], tmp_path / "rows.jsonl")
    result = run_step(tmp_path, "--model-uri", str(wrapper_dir), "--input", str(source), "--output", str(tmp_path / "out"),
                      PATH=str(BIN))  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Spark needs Java 17")
    assert "apt-get install openjdk-17-jre-headless" in last


def test_evaluate_on_spark_scores_as_in_process_and_a_failed_gate_fails_the_run(
    pipeline_run, tracking_server: TrackingServer
):
    """A CI job's evaluate: on Spark, with a floor no model reaches and fail_on_gate=true. Same
    models, rows and settings as `main`'s evaluate, so the quality metrics are equal; the run
    then fails naming the gate, with its metrics and gate tags logged."""
    uris = {step: pipeline_run.model_uri(step) for step in ("log_pipeline", "log_onnx_wrapper")}
    params = project_params(
        f"pipeline_model_uri={uris['log_pipeline']}", f"onnx_model_uri={uris['log_onnx_wrapper']}",
        "max_rows=3", "max_tokens=8", "pipeline_registered_model=", "onnx_registered_model=e2e-ci-gate",
        "engine=spark", "min_correct_rate=1.1", "fail_on_gate=true",
    )  # fmt: skip
    result = mlflow_run(tracking_server, "-e", "evaluate", "--experiment-name", "evaluate-spark", *params)
    assert result.returncode != 0
    assert "error: promotion gate failed for onnx and fail_on_gate=true" in result.stderr
    [run] = [r for r in runs_of("evaluate-spark") if r.data.tags.get(STEP_TAG) == "evaluate"]
    assert run.info.status == "FAILED"
    assert run.data.tags["gate.onnx.passed"] == "false"
    on_spark, in_process = run.data.metrics, pipeline_run.children["evaluate"].data.metrics
    for name in ("pipeline", "onnx"):
        assert on_spark[f"{name}/engine_agreement_rate"] == 1.0
        for metric in ("answer_correct_rate", "token_f1_mean", "well_formed_rate", "completion_tokens_mean"):
            assert on_spark[f"{name}/{metric}"] == in_process[f"{name}/{metric}"], metric
        # Timed in process. Not its decode speed: the tiny model's few-token answers take ~4 ms,
        # and their decode time is below the timing noise (NaN, see evaluation.summarize).
        assert on_spark[f"{name}/latency_p50_s"] > 0
        assert on_spark[f"{name}/ttft_median_s"] > 0
    assert on_spark["parity/exact_match_rate"] == in_process["parity/exact_match_rate"]
