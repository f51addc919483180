"""Entry point `main`: download → log_pipeline → log_onnx_wrapper → evaluate, as child runs.

Each step runs with `mlflow.projects.run` under this parent run, with the env manager passed on
explicitly, and receives its inputs as run ids and model URIs only. A step whose cache key
(slmkit.workflow.cache) matches a FINISHED run in the experiment is reused instead of run again, unless
`force` says otherwise: the same rule, through the same `StepRunner`, as a step run alone uses
for its upstream. The steps and their order come from slmkit/workflow/steps.py. The parent records, per step, the param `<step>_run_id` and the tag
`cache.<step>` ("reused run X" or "ran run Y", and why), and prints a summary at the end.

Params: the union of the steps' params (see MLproject); `env_manager` is passed to every child;
`force`: false, true, or a step name to rerun from that step on.
"""

from __future__ import annotations

import argparse

import mlflow

from slmkit.evaluation.promotion import served_model_uri
from slmkit.evaluation.report import format_summary
from slmkit.sources.presets import resolve_model
from slmkit.workflow.cache import StepRunner, forced_steps, handed_on, step_run
from slmkit.workflow.cli import parse_bool, run_cli
from slmkit.workflow.steps import ORDER, STEPS


def record_step(step: str, run_id: str, why: str) -> None:
    """What the parent run keeps of each step: its run id, and whether it was reused and why."""
    mlflow.log_param(f"{step}_run_id", run_id)
    mlflow.set_tag(f"cache.{step}", why)
    print(f"{step}: {why}")  # noqa: T201 - progress a user reads in the `mlflow run` output


def main(args: argparse.Namespace) -> None:
    forced = forced_steps(args.force)
    spec = resolve_model(args.model, args.revision)
    parse_bool("allow_pickle", args.allow_pickle)
    given = STEPS["main"].values(vars(args))
    with step_run("main", given, spec.name) as parent:
        runner = StepRunner(args.env_manager, parent.info.experiment_id, forced, record_step)
        for step in ORDER:
            runner.run(step, given)
        uris = {"pipeline": handed_on("log_pipeline", runner.runs["log_pipeline"])}
        uris["onnx"] = handed_on("log_onnx_wrapper", runner.runs["log_onnx_wrapper"])
        evaluated = mlflow.get_run(runner.runs["evaluate"]).data
        gate = {
            key.split(".")[1]: value
            for key, value in evaluated.tags.items()
            if key.startswith("gate.") and key.count(".") == 1
        }
        served = served_model_uri([args.onnx_registered_model, args.pipeline_registered_model], uris["onnx"])
        summary = format_summary(
            parent.info.run_id, runner.runs, uris, evaluated.metrics, gate, mlflow.get_tracking_uri(), served
        )
        mlflow.log_text(summary, "summary.txt")
    print(summary)  # noqa: T201 - the report `make run` ends with


if __name__ == "__main__":
    run_cli(main, STEPS["main"].build_parser(__doc__))
