"""Entry point `batch_infer`: answer a table of conversations with either model, on Spark.

Params:
    model_uri: the chat model (`models:/slm-chat-onnx@champion`, `runs:/…`, a local folder).
    input: rows with a `messages` column (OpenAI chat messages, or their JSON text) and optional
        `max_tokens` and `temperature` columns: a JSONL or Parquet file or folder, an artifact
        URI, or (engine=spark) a table name such as `catalog.schema.conversations`.
    output: a Parquet folder, or (engine=spark) a table name, written as a Delta table.
    max_tokens: the completion length of rows without their own.
    engine: `spark` (default; `mlflow.pyfunc.spark_udf` on the active session, or a local[*]
        one) or `local` (in process, no Spark; the same answers for small inputs).
    partitions: how many Spark partitions the rows are spread over.
    concurrency: rows answered at once in each worker (0: 4 for the ONNX model, whose batching
        decodes them together; 1 for the pipeline).

Every input row comes out, in order, with `answer`, `finish_reason`, `prompt_tokens`,
`completion_tokens` and `error` added; a row the model refuses has its message in `error` and
empty answer fields, and does not fail the job.

Logs (tag `slmkit.step=batch_infer`): the input as a dataset; params; the output location
(param `output`, tag `slmkit.output`); metrics `rows`, `rows_with_error`, `prompt_tokens`,
`completion_tokens`, `wall_seconds`, `rows_per_s`, `completion_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import mlflow

from slmkit.batch.spark import (
    answer_locally,
    answer_with_spark,
    is_table_name,
    read_pandas,
    read_spark,
    save_batch_model,
    spark_session,
)
from slmkit.errors import UserError
from slmkit.sources.eval_set import is_artifact_uri
from slmkit.workflow.cache import step_run
from slmkit.workflow.cli import positive_int, run_cli
from slmkit.workflow.lineage import scratch_dir
from slmkit.workflow.steps import OUTPUT_TAG, STEPS


def local_input(value: str, scratch: Path) -> str:
    """A path or table name Spark or pandas can read; artifact URIs are downloaded first."""
    if not value:
        raise UserError("input is empty: pass a JSONL or Parquet file or folder, an artifact URI, or a table name")
    if is_artifact_uri(value):
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=value, dst_path=str(scratch / "input"))
        except Exception as error:
            raise UserError(f"input={value}: cannot fetch it: {error}") from None
    if not Path(value).exists() and not is_table_name(value):
        raise UserError(f"input={value}: no such file or folder")
    return value


def replace_folder(written: Path, output: Path) -> None:
    """Put a finished output in place; until then `output` keeps what it held."""
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    written.rename(output)


def output_metrics(frame: Any, wall_seconds: float) -> dict[str, float]:
    """What the written rows say (a pandas frame of the output's counting columns)."""
    rows = len(frame)
    completion = float(frame["completion_tokens"].fillna(0).sum())
    return {
        "rows": rows,
        "rows_with_error": int(frame["error"].notna().sum()),
        "prompt_tokens": float(frame["prompt_tokens"].fillna(0).sum()),
        "completion_tokens": completion,
        "wall_seconds": wall_seconds,
        "rows_per_s": rows / wall_seconds,
        "completion_tokens_per_s": completion / wall_seconds,
    }


def run_local(args: argparse.Namespace, source: str, batch_model_dir: Path, output: Path) -> dict[str, float]:
    frame = read_pandas(Path(source))
    mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=Path(source).name), context="batch_infer")
    started = time.perf_counter()
    answered = answer_locally(mlflow.pyfunc.load_model(str(batch_model_dir)), frame, args.max_tokens)
    wall = time.perf_counter() - started
    staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        answered.to_parquet(staging / "part-00000.parquet", index=False)
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_metrics(answered, wall)


def run_spark(args: argparse.Namespace, spark: Any, source: str, batch_model_dir: Path) -> dict[str, float]:
    frame = read_spark(spark, source)
    dataset = (
        mlflow.data.from_spark(frame, table_name=source)
        if is_table_name(source)
        else mlflow.data.from_spark(frame, path=source)
    )
    mlflow.log_input(dataset, context="batch_infer")
    started = time.perf_counter()
    answered = answer_with_spark(spark, batch_model_dir, frame, args.partitions, args.max_tokens)
    if is_table_name(args.output):
        answered.write.format("delta").mode("overwrite").saveAsTable(args.output)
        written = spark.table(args.output)
    else:
        output = Path(args.output).resolve()
        staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            answered.write.parquet(str(staging))
            replace_folder(staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written = spark.read.parquet(str(output))
    wall = time.perf_counter() - started
    return output_metrics(written.select("error", "prompt_tokens", "completion_tokens").toPandas(), wall)


def main(args: argparse.Namespace) -> None:
    positive_int("partitions", args.partitions)
    positive_int("max_tokens", args.max_tokens)
    if args.concurrency < 0:
        raise UserError(f"concurrency={args.concurrency}: must be 0 (automatic) or more")
    if not args.output:
        raise UserError("output is empty: pass a folder for the Parquet output, or a table name")
    if args.engine == "local" and is_table_name(args.output):
        raise UserError(f"output={args.output}: tables need engine=spark; pass a folder for engine=local")
    values = STEPS["batch_infer"].values(vars(args))
    with step_run("batch_infer", values, args.model_uri), scratch_dir("batch") as scratch:
        source = local_input(args.input, Path(scratch))
        spark = spark_session(args.partitions) if args.engine == "spark" else None  # no Java: one line, now
        batch_model_dir = save_batch_model(args.model_uri, Path(scratch) / "batch_model", args.concurrency)
        if spark is None:
            metrics = run_local(args, source, batch_model_dir, Path(args.output).resolve())
        else:
            metrics = run_spark(args, spark, source, batch_model_dir)
        mlflow.log_metrics(metrics)
        mlflow.set_tag(OUTPUT_TAG, args.output)
        print(  # noqa: T201 - the step's one-line summary
            f"batch_infer: {metrics['rows']} rows ({metrics['rows_with_error']} with an error) "
            f"in {metrics['wall_seconds']:.1f} s, {metrics['rows_per_s']:.2f} rows/s -> {args.output}"
        )


if __name__ == "__main__":
    run_cli(main, STEPS["batch_infer"].build_parser(__doc__))
