"""The `batch_infer` step's two engines: Spark through `mlflow.pyfunc.spark_udf`, and in process.

Spark does all the distribution: `spark_udf` ships the batch model (`wrappers/batch_chat_model.py`
holding the chat model) to every executor, loads it once per Python worker, and hands it pandas
batches. Locally the step starts a `local[*]` session; on Databricks it uses the cluster's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from slmkit import LIBRARY, PROJECT_ROOT
from slmkit.batch.rows import ANSWER_COLUMN, OUTPUT_DDL, OUTPUT_TYPES, REQUEST_COLUMN, answers_frame, row_request
from slmkit.errors import UserError
from slmkit.onnx.session import THREADS_ENV

ENGINES = ("spark", "local")
BATCH_MODEL_FILE = PROJECT_ROOT / "wrappers" / "batch_chat_model.py"
ROW_INDEX = "_slmkit_row"
ANSWER = "_slmkit_answer"
# Unity Catalog or Hive table names (catalog.schema.table or schema.table), as opposed to paths.
TABLE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_`][\w`-]*){1,2}$")
LOCAL_DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
JAVA_HINT = (
    "Spark needs Java 17 or later, and `java` is not on PATH: install a JDK (Debian/Ubuntu: "
    "`sudo apt-get install openjdk-17-jre-headless`) or set JAVA_HOME, or run with -P engine=local"
)


def is_table_name(value: str) -> bool:
    return bool(TABLE_NAME.match(value)) and not Path(value).exists()


def require_java() -> None:
    """Fail in one line, before PySpark tries to start a JVM that is not there."""
    java_home = os.environ.get("JAVA_HOME", "")
    if shutil.which("java") is None and not (java_home and (Path(java_home) / "bin" / "java").is_file()):
        raise UserError(JAVA_HINT)


def spark_session(partitions: int) -> Any:
    """The active session (Databricks, a notebook), or a local one sized for a small machine."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    require_java()
    cpus = len(os.sched_getaffinity(0))
    # Workers run this interpreter (the venv), not whatever `python3` is first on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Each Python worker loads its own copy of the model: share the CPUs between them.
    os.environ.setdefault(THREADS_ENV, str(max(1, cpus // max(1, min(partitions, cpus)))))
    return (
        SparkSession.builder.master(f"local[{cpus}]")
        .appName("slmkit-batch-infer")
        .config("spark.driver.memory", "4g")
        # The driver only moves Arrow batches between the Python workers that run the model: the
        # JVM's optimising compiler and parallel GC threads would take ~30 % of a short job's
        # CPU from those workers, on the same few cores.
        .config("spark.driver.extraJavaOptions", LOCAL_DRIVER_JAVA_OPTIONS)
        .config("spark.sql.shuffle.partitions", str(max(1, partitions)))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )


def save_batch_model(chat_model_uri: str, dest: Path, concurrency: int = 0) -> Path:
    """The batch model, holding a copy of the chat model, saved at `dest` for spark_udf."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", REQUEST_COLUMN)]), outputs=Schema([ColSpec("string", ANSWER_COLUMN)])
    )
    try:
        # No input example, on purpose: MLflow would load the chat model and answer the example
        # while saving. The signature above says what the model takes, so its warning is noise.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            mlflow.pyfunc.save_model(
                str(dest),
                python_model=str(BATCH_MODEL_FILE),
                artifacts={"chat_model": chat_model_uri},
                model_config={"concurrency": concurrency},
                code_paths=[str(LIBRARY)],
                signature=signature,
                pip_requirements=["mlflow"],  # spark_udf runs it with env_manager="local": never installed
            )
    except MlflowException as error:
        raise UserError(f"model_uri={chat_model_uri}: cannot fetch the model: {error.message}") from None
    return dest


def input_format(path: Path) -> str:
    """`json` (JSON Lines) or `parquet`, from the file's or the folder's files' suffix."""
    files = [p for p in ([path] if path.is_file() else sorted(path.iterdir())) if not p.name.startswith(("_", "."))]
    suffixes = {p.suffix.lower() for p in files}
    if suffixes and suffixes <= {".jsonl", ".json"}:
        return "json"
    if suffixes and suffixes <= {".parquet"}:
        return "parquet"
    raise UserError(
        f"input={path}: expected JSONL (.jsonl) or Parquet (.parquet) files, found {sorted(suffixes) or 'none'}"
    )


def read_pandas(path: Path) -> Any:
    import pandas as pd

    if input_format(path) == "parquet":
        return pd.read_parquet(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json"))
    rows = [
        json.loads(line) for file in files for line in file.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return pd.DataFrame(rows)


def check_columns(columns: list[str]) -> None:
    if "messages" not in columns:
        raise UserError(f"the input has no `messages` column (columns: {', '.join(columns)})")
    clashes = sorted(set(columns) & set(OUTPUT_TYPES))
    if clashes:
        raise UserError(f"the input already has the output column(s) {', '.join(clashes)}: rename them")


def answer_locally(batch_model: Any, frame: Any, default_max_tokens: int) -> Any:
    """The `local` engine: the batch model's predict over the whole table, in process."""
    import pandas as pd

    check_columns(list(frame.columns))
    requests = [
        row_request(row.get("messages"), row.get("max_tokens"), row.get("temperature"), default_max_tokens)
        for row in frame.to_dict(orient="records")
    ]
    answers = answers_frame(batch_model.predict(pd.DataFrame({REQUEST_COLUMN: requests}))[ANSWER_COLUMN])
    return pd.concat([frame.reset_index(drop=True), answers.reset_index(drop=True)], axis=1)


def read_spark(spark: Any, source: str) -> Any:
    """A table by name, or JSONL / Parquet files."""
    if is_table_name(source):
        return spark.table(source)
    path = Path(source)
    reader = spark.read.option("mode", "PERMISSIVE")
    return reader.json(str(path)) if input_format(path) == "json" else reader.parquet(str(path))


def answer_with_spark(spark: Any, batch_model_dir: Path, frame: Any, partitions: int, default_max_tokens: int) -> Any:
    """Every input row with the answer columns added, in the input's order, through spark_udf."""
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    check_columns(frame.columns)
    messages = F.col("messages")
    if isinstance(frame.schema["messages"].dataType, StringType):  # JSON text: parsed by the model's checks
        messages = F.from_json(messages, "array<map<string,string>>")
    fields = [messages.alias("messages")]
    given = set(frame.columns)
    max_tokens = F.col("max_tokens").cast("long") if "max_tokens" in given else F.lit(None).cast("long")
    if default_max_tokens:
        max_tokens = F.coalesce(max_tokens, F.lit(default_max_tokens).cast("long"))
    fields.append(max_tokens.alias("max_tokens"))
    if "temperature" in given:
        fields.append(F.col("temperature").cast("double").alias("temperature"))
    answer = mlflow.pyfunc.spark_udf(spark, str(batch_model_dir), result_type="string", env_manager="local")
    indexed = frame.withColumn(ROW_INDEX, F.monotonically_increasing_id())
    requests = indexed.withColumn(REQUEST_COLUMN, F.to_json(F.struct(*fields))).repartition(partitions)
    answered = requests.withColumn(ANSWER, F.from_json(answer(F.struct(REQUEST_COLUMN)), OUTPUT_DDL))
    columns = [F.col(f"`{name}`") for name in frame.columns] + [F.col(f"{ANSWER}.{name}") for name in OUTPUT_TYPES]
    return answered.orderBy(ROW_INDEX).select(*columns)


def answer_eval_rows(
    spark: Any, model_uri: str, rows: list[Any], max_tokens: int, scratch: Path, partitions: int
) -> list[dict[str, Any]]:
    """Greedy ChatCompletions of eval rows through the batch path (`evaluate -P engine=spark`),
    in the rows' order. Eval rows are the evaluation's own: a refused one is an error."""
    scratch.mkdir(parents=True, exist_ok=True)
    table = scratch / "eval_rows.jsonl"
    table.write_text(
        "".join(json.dumps({"row_id": r.row_id, "messages": r.messages, "temperature": 0.0}, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )  # fmt: skip
    batch_model_dir = save_batch_model(model_uri, scratch / "batch_model")
    answered = answer_with_spark(
        spark, batch_model_dir, read_spark(spark, str(table)), partitions, max_tokens
    ).toPandas()
    refused = answered[answered["error"].notna()]
    if len(refused):
        first = refused.iloc[0]
        raise UserError(f"{model_uri} refused {len(refused)} eval row(s), first {first['row_id']}: {first['error']}")
    return [
        {
            "choices": [{"message": {"role": "assistant", "content": a.answer}, "finish_reason": a.finish_reason}],
            "usage": {"prompt_tokens": int(a.prompt_tokens), "completion_tokens": int(a.completion_tokens)},
        }
        for a in answered.itertuples()
    ]
