"""What the steps do differently inside a Databricks job: hand run ids to later tasks.

Databricks Jobs pass values between tasks as task values; the job resource
(resources/slm_chat_job.yml) reads them as `{{tasks.<task>.values.<key>}}`. Outside Databricks
these calls do nothing, so the steps stay the same scripts everywhere.
"""

from __future__ import annotations

import os

# Task value keys, one per step that hands something on.
DOWNLOAD_RUN_ID = "download_run_id"
PIPELINE_MODEL_URI = "pipeline_model_uri"
ONNX_MODEL_URI = "onnx_model_uri"


def in_databricks_job() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def publish_task_value(key: str, value: str) -> None:
    """Set a task value for later tasks of the same job run; a no-op outside Databricks."""
    if not in_databricks_job():
        return
    from databricks.sdk.runtime import dbutils

    dbutils.jobs.taskValues.set(key=key, value=value)
