"""The step declarations (slmkit/workflow/steps.py) against the files people read and edit by hand:
MLproject and the Databricks job files must name the same params with the same defaults."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError
from slmkit.workflow.steps import CACHED_STEPS, ORDER, STEPS, Param

MLPROJECT = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
JOBS = {
    name: job
    for path in sorted((PROJECT_ROOT / "resources").glob("*.yml"))
    for name, job in yaml.safe_load(path.read_text())["resources"]["jobs"].items()
}
JOB_PARAMETER = re.compile(r"\{\{job\.parameters\.(\w+)\}\}")
# Job parameters whose default differs from the step's on purpose, and why.
DATABRICKS_DEFAULTS = {
    "execution_provider": "the job cluster has a GPU",
    "max_rows": "a nightly run scores a fixed 24 rows",
    "max_tokens": "batch answers are full length",
    "partitions": "a multi-node cluster",
    "pipeline_registered_model": "a Unity Catalog name",
    "onnx_registered_model": "a Unity Catalog name",
    "model_uri": "a Unity Catalog name",
    "input": "a Unity Catalog table",
    "output": "a Unity Catalog table",
}


def canonical(param: Param, value: object) -> str:
    return str(param.parse(str(value)))


def test_mlproject_has_exactly_the_declared_entry_points():
    assert set(MLPROJECT) == set(STEPS)


@pytest.mark.parametrize("step", list(STEPS))
def test_mlproject_params_types_and_defaults_match_the_declaration(step: str):
    declared = {p.name: p for p in STEPS[step].params}
    written = MLPROJECT[step]["parameters"]
    assert set(written) == set(declared)
    for name, spec in written.items():
        assert spec.get("type", "string") == declared[name].type, name
        assert canonical(declared[name], spec.get("default", "")) == canonical(declared[name], declared[name].default)


@pytest.mark.parametrize("step", list(STEPS))
def test_mlproject_command_passes_every_param_by_its_flag(step: str):
    command = " ".join(MLPROJECT[step]["command"].split())
    assert command.startswith(f"python -m steps.{step} ")
    for param in STEPS[step].params:
        assert f"{param.flag} {{{param.name}}}" in command


def test_main_takes_every_param_of_its_steps_but_the_upstream_inputs():
    filled = {name for step in CACHED_STEPS for name in step.inputs}
    main = {p.name for p in STEPS["main"].params}
    for step in CACHED_STEPS:
        assert {p.name for p in step.params} - filled - {"engine"} <= main, step.name
    assert not main & filled
    assert ORDER == ("download", "log_pipeline", "log_onnx_wrapper", "evaluate")


def test_upstream_inputs_are_handed_on_by_the_step_they_name():
    for step in CACHED_STEPS:
        for param, upstream in step.inputs.items():
            assert STEPS[upstream].hands_on == param
            assert ORDER.index(upstream) < ORDER.index(step.name)


@pytest.mark.parametrize(
    ("job", "task"),
    [(job, task) for job in JOBS.values() for task in job["tasks"]],
    ids=[task["task_key"] for job in JOBS.values() for task in job["tasks"]],
)
def test_job_tasks_pass_declared_flags_and_job_defaults_match_the_steps(job: dict, task: dict):
    step, *flags = task["spark_python_task"]["parameters"]
    declared = STEPS[step]
    by_flag = {p.flag: p for p in declared.params}
    defaults = {p["name"]: p["default"] for p in job.get("parameters", [])}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        assert flag in by_flag, f"{step} takes no {flag}"
        used = JOB_PARAMETER.fullmatch(str(value))
        if used is None:
            continue
        name = used.group(1)
        assert name == by_flag[flag].name, f"{flag} is fed from job parameter {name}"
        if name not in DATABRICKS_DEFAULTS:
            assert canonical(by_flag[flag], defaults[name]) == canonical(by_flag[flag], by_flag[flag].default), name
    resolved = [JOB_PARAMETER.sub(lambda m: str(defaults[m.group(1)]), str(f)) for f in flags]
    _, unknown = declared.build_parser(None).parse_known_args([re.sub(r"\{\{.*\}\}", "x", f) for f in resolved])
    assert unknown == []


def test_parsers_are_built_from_the_declaration():
    args = STEPS["log_onnx_wrapper"].build_parser(None).parse_args(["--calibration-rows", "3"])
    assert args.calibration_rows == 3
    assert args.min_top1_agreement == 0.9
    assert args.tracing == "true"


# Each step refuses a bad parameter with a UserError before any work; through `mlflow run`, that
# is one `error:` line and a FAILED run (test_pipeline_e2e checks that frame on two of them).
BAD_PARAMETERS = [
    ("log_onnx_wrapper", ["--model", "smollm2-135m", "--execution-provider", "tpu"], "execution_provider='tpu'"),
    ("log_pipeline", ["--download-run-id", "0123", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (
        "log_onnx_wrapper",
        ["--model", "smollm2-135m", "--quantization", "int3"],
        "quantization='int3' is not available: use one of gguf, int4, int4-kquant, int8, fp32, auto",
    ),
    (
        "log_onnx_wrapper",
        ["--model", "smollm2-135m", "--quantization", "fp16"],
        "quantization='fp16' is not available on execution_provider=cpu",
    ),
    ("log_onnx_wrapper", ["--model", "./data", "--quantization", "gguf"], "quantization='gguf' needs a GGUF source"),
]


@pytest.mark.parametrize(("step", "argv", "message"), BAD_PARAMETERS)
def test_steps_refuse_bad_parameters_before_any_work_naming_the_parameter(step: str, argv: list[str], message: str):
    module = importlib.import_module(f"steps.{step}")
    with pytest.raises(UserError) as refused:
        module.main(STEPS[step].build_parser(module.__doc__).parse_args(argv))
    assert message in str(refused.value)


def readme_parameter_rows() -> list[dict[str, list[str]]]:
    """The README's entry-point table: per row, its parameter, entry points, default and values."""
    text = (PROJECT_ROOT / "README.md").read_text()
    table = text.split("### Entry points and parameters")[1].split("\n## ")[0]
    rows = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        ticked = [re.findall(r"`([^`]*)`", cell) for cell in cells[:4]]
        rows.append(dict(zip(("param", "steps", "default", "values"), ticked, strict=True)))
    return rows


def test_readme_table_names_every_param_with_its_default_and_allowed_values():
    rows = readme_parameter_rows()
    documented = {(row["param"][0], step) for row in rows for step in row["steps"]}
    declared = {(param.name, step.name) for step in STEPS.values() for param in step.params}
    assert documented == declared
    for row in rows:
        for step in row["steps"]:
            param = next(p for p in STEPS[step].params if p.name == row["param"][0])
            written = row["default"][0].strip('"')
            assert canonical(param, written) == canonical(param, param.default), (step, param.name)
            assert tuple(row["values"]) == param.choices, (step, param.name)


def test_mlproject_comments_name_the_allowed_values_above_every_param_with_choices():
    lines = (PROJECT_ROOT / "MLproject").read_text().splitlines()
    entry_point = ""
    for number, line in enumerate(lines):
        if re.match(r"^  \w+:$", line):
            entry_point = line.strip().rstrip(":")
        match = re.match(r"^      (\w+): \{", line)
        if not match or entry_point not in STEPS:
            continue
        param = next(p for p in STEPS[entry_point].params if p.name == match[1])
        if param.choices:
            above = lines[number - 1].strip()
            assert above.startswith("#"), f"MLproject {entry_point}.{param.name}: no comment above it"
            assert re.findall(r"`([^`]*)`", above) == list(param.choices), (entry_point, param.name, above)


@pytest.mark.parametrize("step", [step for step in STEPS.values() if any(p.choices for p in step.params)],
                         ids=lambda step: step.name)  # fmt: skip
def test_step_parsers_refuse_values_outside_a_params_choices_in_one_line(step):
    param = next(p for p in step.params if p.choices)
    with pytest.raises(UserError, match=rf"^{param.name}='nope': choose one of {', '.join(param.choices)}$"):
        step.build_parser(None).parse_args([param.flag, "nope"])
