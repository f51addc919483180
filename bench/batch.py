"""Figure 13: `batch_infer`'s Spark engine on the ONNX model: rows/s with 1 and 2 partitions, and
batched `predict` (4 rows of a pandas batch decoded together) against row-at-a-time.

The rows are the eval set's questions, repeated to `rows`; every configuration answers the same
rows through `mlflow.pyfunc.spark_udf` on one local session, after a warm-up pass that loads the
model in each Python worker.

    python -m bench.batch <ONNX model folder or URI> [--rows 96] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.figures import Figure
from slmkit import PROJECT_ROOT
from slmkit.batch.spark import answer_with_spark, read_spark, save_batch_model, spark_session
from slmkit.sources.eval_set import load_eval_set


def rows_per_s(spark: Any, batch_model: Path, source: Path, partitions: int, max_tokens: int) -> float:
    frame = read_spark(spark, str(source))
    count = frame.count()
    answer_with_spark(spark, batch_model, frame, partitions, max_tokens).count()  # warm-up: workers load the model
    started = time.perf_counter()
    answered = answer_with_spark(spark, batch_model, frame, partitions, max_tokens).toPandas()
    elapsed = time.perf_counter() - started
    if len(answered) != count or answered["error"].notna().any():  # a figure over lost rows would mislead
        raise RuntimeError(
            f"batch_infer answered {len(answered)} of {count} rows, {answered['error'].notna().sum()} with an error"
        )
    return count / elapsed


def batch_figures(model_uri: str, work: Path, rows: int, max_tokens: int) -> list[Figure]:
    questions = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl")
    source = work / "batch_rows.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "messages": questions[i % len(questions)].messages}) + "\n" for i in range(rows))
    )
    batched = save_batch_model(model_uri, work / "batch-batched")
    row_at_a_time = save_batch_model(model_uri, work / "batch-row-at-a-time", concurrency=1)
    spark = spark_session(partitions=2)
    try:
        rates = {
            "1 partition, batched": rows_per_s(spark, batched, source, 1, max_tokens),
            "2 partitions, batched": rows_per_s(spark, batched, source, 2, max_tokens),
            "2 partitions, row at a time": rows_per_s(spark, row_at_a_time, source, 2, max_tokens),
        }
    finally:
        spark.stop()
    detail = {"rows": rows, "max_tokens": max_tokens, "rows_per_s": rates}
    return [
        Figure("batch_infer rows/s, 2 partitions / 1", rates["2 partitions, batched"] / rates["1 partition, batched"], detail),
        Figure("batch_infer rows/s, batched predict / row at a time", rates["2 partitions, batched"] / rates["2 partitions, row at a time"], detail),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-batch-") as scratch:
        for figure in batch_figures(args.model_uri, Path(scratch), args.rows, args.max_tokens):
            print(figure.row(), json.dumps(figure.detail))


if __name__ == "__main__":
    main()
