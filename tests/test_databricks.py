"""The Databricks and schedule files: they parse, and every task runs a real step with flags it
accepts. No workspace is reachable from here; what these tests cannot check is in docs/deployment.md."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest
import yaml

from slmkit import PROJECT_ROOT
from slmkit.environment import normalize_name, read_pins
from slmkit.evaluation.promotion import check_registered_name
from slmkit.workflow import databricks
from slmkit.workflow.steps import STEPS

JOB = yaml.safe_load((PROJECT_ROOT / "resources" / "slm_chat_job.yml").read_text())["resources"]["jobs"][
    "slm_chat_pipeline"
]
BATCH_JOB = yaml.safe_load((PROJECT_ROOT / "resources" / "slm_chat_batch_job.yml").read_text())["resources"]["jobs"][
    "slm_chat_batch_infer"
]
BUNDLE = yaml.safe_load((PROJECT_ROOT / "databricks.yml").read_text())
MLPROJECT = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
TASK_VALUE = re.compile(r"\{\{tasks\.(\w+)\.values\.(\w+)\}\}")
JOB_PARAMETER = re.compile(r"\{\{job\.parameters\.(\w+)\}\}")
# Which task publishes which task value (slmkit.workflow.databricks), to check every reference.
PUBLISHED = {(step.name, step.hands_on) for step in STEPS.values() if step.hands_on}


def test_bundle_includes_the_job_and_names_targets():
    bundle = yaml.safe_load((PROJECT_ROOT / "databricks.yml").read_text())
    assert bundle["include"] == ["resources/*.yml"]
    assert set(bundle["targets"]) == {"dev", "prod"}


def test_job_is_scheduled_and_not_concurrent():
    assert JOB["schedule"]["quartz_cron_expression"] == "0 0 3 * * ?"
    assert JOB["max_concurrent_runs"] == 1


def test_each_task_runs_the_launcher():
    for job in (JOB, BATCH_JOB):
        for task in job["tasks"]:
            python_task = task["spark_python_task"]
            launcher = (PROJECT_ROOT / "resources" / python_task["python_file"]).resolve()
            assert launcher == PROJECT_ROOT / "databricks" / "run_step.py"
            assert python_task["parameters"][0] == task["task_key"]


def test_task_values_and_job_parameters_that_tasks_use_exist():
    job_parameters = {p["name"] for p in JOB["parameters"]}
    keys = {t["task_key"]: t for t in JOB["tasks"]}
    for task in JOB["tasks"]:
        text = " ".join(map(str, task["spark_python_task"]["parameters"]))
        for source, value in TASK_VALUE.findall(text):
            assert (source, value) in PUBLISHED
            assert {"task_key": source} in task["depends_on"]
        assert set(JOB_PARAMETER.findall(text)) <= job_parameters
    assert keys["evaluate"]["depends_on"] == [{"task_key": "log_pipeline"}, {"task_key": "log_onnx_wrapper"}]


def test_registered_model_defaults_are_unity_catalog_names():
    defaults = {p["name"]: p["default"] for p in JOB["parameters"]}
    for name in ("pipeline_registered_model", "onnx_registered_model"):
        example = defaults[name].replace("${var.catalog}", "main").replace("${var.schema}", "slm_chat")
        assert example.count(".") == 2
        assert check_registered_name(example, name) == example


def pinned(libraries: list[dict]) -> dict[str, str]:
    return {normalize_name(lib["pypi"]["package"].split("==")[0]): lib["pypi"]["package"] for lib in libraries}


def test_job_libraries_and_cluster_spec_match_conda_yaml_pins():
    pins = read_pins()
    libraries = pinned(JOB["tasks"][0]["libraries"])
    assert "torch" not in libraries  # the ML GPU runtime's own torch
    cuda_version = pins["onnxruntime-genai"].split("==")[1]
    assert libraries.pop("onnxruntime-genai-cuda") == f"onnxruntime-genai-cuda=={cuda_version}"
    assert all(pins[name] == line for name, line in libraries.items())
    spec = json.loads((PROJECT_ROOT / "databricks" / "cluster-spec.json").read_text())
    assert pinned(spec["libraries"]) == {"onnxruntime-genai-cuda": f"onnxruntime-genai-cuda=={cuda_version}"}


def test_tokens_come_from_secret_scopes_only():
    spec = json.loads((PROJECT_ROOT / "databricks" / "cluster-spec.json").read_text())
    for env in (spec["new_cluster"]["spark_env_vars"], JOB["job_clusters"][0]["new_cluster"]["spark_env_vars"]):
        assert env["HF_TOKEN"].startswith("{{secrets/")
    assert "gpu-ml" in spec["new_cluster"]["spark_version"]
    assert spec["new_cluster"]["spark_version"].startswith("12.2.")  # projects need DBR < 13 on job clusters


def test_systemd_units_parse_and_keep_logs():
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(PROJECT_ROOT / "schedule" / "slm-chat.service")
    assert "make run" in service["Service"]["ExecStart"]
    assert "logs/scheduled.log" in service["Service"]["ExecStart"]
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(PROJECT_ROOT / "schedule" / "slm-chat.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 03:00:00"
    assert timer["Timer"]["Persistent"] == "true"


def test_publishing_task_values_is_a_no_op_outside_databricks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    assert not databricks.in_databricks_job()
    databricks.publish_task_value("download_run_id", "abc")  # must not import dbutils or fail


@pytest.mark.integration
def test_launcher_refuses_unknown_steps(tmp_path: Path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "databricks" / "run_step.py"), "train"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "usage: run_step.py {download|log_pipeline|log_onnx_wrapper|evaluate|batch_infer|main}" in result.stderr


def test_batch_job_answers_a_table_on_a_multi_node_cluster_into_delta():
    from slmkit.batch.spark import is_table_name

    [cluster] = BATCH_JOB["job_clusters"]
    assert cluster["new_cluster"]["num_workers"] == "${var.batch_num_workers}"
    assert int(BUNDLE["variables"]["batch_num_workers"]["default"]) >= 2
    defaults = {p["name"]: p["default"] for p in BATCH_JOB["parameters"]}
    for name in ("input", "output"):  # Unity Catalog tables: read with spark.table, written as Delta
        assert is_table_name(defaults[name].replace("${var.catalog}", "main").replace("${var.schema}", "slm_chat"))
    assert defaults["model_uri"].startswith("models:/")
    assert defaults["model_uri"].endswith("@champion")
    [task] = BATCH_JOB["tasks"]
    flags = task["spark_python_task"]["parameters"]
    assert flags[flags.index("--engine") + 1] == "spark"


def test_batch_job_libraries_match_conda_yaml_pins_and_leave_spark_to_the_runtime():
    pins = read_pins()
    libraries = pinned(BATCH_JOB["tasks"][0]["libraries"])
    assert "pyspark" not in libraries  # the Databricks runtime's own Spark
    assert "pyspark" in pins  # while local runs pin it
    assert all(pins[name] == line for name, line in libraries.items())
