"""`batch_infer` and `evaluate -P engine=spark` on a real local Spark session, on the tiny Phi-3.

`batch_infer` runs as a user runs it, through `mlflow run`; the CI-style evaluate as
`python -m steps.evaluate`, the command MLproject gives the entry point (the CLI's own start is
~3.5 s of CPU, and other tests cover it). Each starts its own session: one Spark pass per test,
since a session costs its JVM's start (seconds of CPU) whichever process runs it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from slmkit import PROJECT_ROOT
from slmkit.batch.spark import LOCAL_DRIVER_JAVA_OPTIONS, answer_locally, save_batch_model
from slmkit.sources.eval_set import load_eval_set
from slmkit.workflow.steps import STEP_TAG
from tests.conftest import BIN, TrackingServer, mlflow_run, project_params, run_step_module, runs_of

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


@contextlib.contextmanager
def java_command_lines() -> Iterator[list[list[str]]]:
    """The command lines of the `java` processes seen while the block runs (polled each 0.5 s)."""
    seen: list[list[str]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    arguments = cmdline.read_bytes().decode(errors="replace").split("\0")
                    if arguments[0].endswith("/java") and arguments not in seen:
                        seen.append(arguments)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def in_process_answer(model: mlflow.pyfunc.PyFuncModel, row: dict) -> dict:
    request = {"messages": row["messages"], "max_tokens": row.get("max_tokens", MAX_TOKENS), "temperature": 0}
    return model.predict(request)[0]


@pytest.mark.slow(seconds=30)
def test_batch_infer_on_spark_answers_every_row_in_order_as_the_local_engine_and_predict_alone_and_logs_it(
    tracking_server: TrackingServer, wrapper_dir: Path, tmp_path: Path
):
    """The step as a user runs it, through `mlflow run`, on a local Spark session over two
    partitions: rows in equal rows out, in order; equal, column for column, to the local engine
    in this process; each answer the chat model's own. The pipeline model's Spark answers are
    checked against its own in test_evaluate_on_spark_scores_as_in_process (the batch model
    around either chat model is the same code)."""
    source, output = write_jsonl(ROWS, tmp_path / "rows.jsonl"), tmp_path / "answered"
    params = project_params(
        f"model_uri={wrapper_dir}", f"input={source}", f"output={output}", f"max_tokens={MAX_TOKENS}", "partitions=2"
    )
    with java_command_lines() as javas:
        result = mlflow_run(tracking_server, "-e", "batch_infer", "--experiment-name", "batch", *params)
    assert result.returncode == 0, result.stderr[-3000:]
    # The driver JVM the step started ran with the small-machine options (slmkit.batch.spark).
    assert any(set(LOCAL_DRIVER_JAVA_OPTIONS.split()) <= set(java) for java in javas if "pyspark" in " ".join(java))
    written = pd.read_parquet(output)
    assert list(written["id"]) == [row["id"] for row in ROWS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = save_batch_model(str(wrapper_dir), tmp_path / "batch-model")
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []  # no input-example noise
    batch_model = mlflow.pyfunc.load_model(str(saved))
    local = answer_locally(batch_model, pd.read_json(source, lines=True), MAX_TOKENS)
    columns = ["id", "answer", "finish_reason", "completion_tokens", "error"]
    assert written[columns].astype(object).where(written[columns].notna(), None).values.tolist() == (
        local[columns].astype(object).where(local[columns].notna(), None).values.tolist()
    )
    model = mlflow.pyfunc.load_model(str(wrapper_dir), model_config={"tracing": "false"})
    for row, out in zip(ROWS, written.itertuples(), strict=True):
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
    unicode = written[written["id"] == "unicode"].iloc[0]
    assert unicode["messages"][0]["content"] == "Привет 👋 你好 — ça va?"
    assert written.loc[written["id"] == "eval-0", "answer"].item() == "Paris."  # the trained rows answer
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
    result = run_step_module(
        tracking_server, "evaluate-spark", "evaluate",
        f"pipeline_model_uri={uris['log_pipeline']}", f"onnx_model_uri={uris['log_onnx_wrapper']}",
        "max_rows=3", "max_tokens=8", "pipeline_registered_model=", "onnx_registered_model=e2e-ci-gate",
        "engine=spark", "min_correct_rate=1.1", "fail_on_gate=true",
    )  # fmt: skip
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
