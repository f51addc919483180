"""Entry point `main`: download → log_pipeline → log_onnx_wrapper → evaluate, as child runs.

Each step runs with `mlflow.projects.run` under this parent run, with the env manager passed on
explicitly, and receives its inputs as run ids and model URIs only. A step whose cache key
(slmkit.cache) matches a FINISHED run in the experiment is reused instead of run again, unless
`force` says otherwise. The parent records, per step, the param `<step>_run_id` and the tag
`cache.<step>` ("reused run X" or "ran run Y", and why), and prints a summary at the end.

Params: the union of the steps' params (see MLproject); `env_manager` is passed to every child;
`force`: false, true, or a step name to rerun from that step on.
"""

from __future__ import annotations

import argparse

import mlflow

from slmkit.cache import CACHE_KEY_TAG, cache_key, forced_steps, parameter_types, step_lock
from slmkit.checkpoint import source_revision
from slmkit.evaluation import eval_set_digest
from slmkit.lineage import MODEL_URI_TAG, STEP_TAG, check_env_manager, run_entry_point, run_name
from slmkit.presets import resolve_model
from slmkit.step_cli import (
    EVALUATION_OPTIONS,
    GENERATION_OPTIONS,
    QUANTIZATION_OPTIONS,
    add_options,
    forward,
    parse_bool,
    run_cli,
)
from slmkit.summary import format_summary


def finished_run_with_key(experiment_id: str, key: str) -> str | None:
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


class StepRunner:
    """Runs or reuses each step of one `main` run and records which, and why."""

    def __init__(self, parent: mlflow.ActiveRun, env_manager: str, forced: frozenset[str]) -> None:
        self.parent, self.env_manager, self.forced = parent, env_manager, forced
        self.runs: dict[str, str] = {}

    def __call__(self, step: str, params: dict[str, str], upstream: dict[str, str]) -> str:
        key = cache_key(step, params, upstream)
        experiment_id = self.parent.info.experiment_id
        with step_lock(key):
            found = None if step in self.forced else finished_run_with_key(experiment_id, key)
            if found:
                run_id, why = found, f"reused run {found}: a FINISHED run has cache key {key[:12]}"
            else:
                if "env_manager" in parameter_types(step):
                    params = {**params, "env_manager": self.env_manager}
                # Tagged at its start: a lookup takes FINISHED runs only, and a step that finished
                # just before the tracking server was lost is still found after a restart.
                run_id = run_entry_point(step, params, self.env_manager, experiment_id, {CACHE_KEY_TAG: key})
                reason = "forced" if step in self.forced else f"no FINISHED run has cache key {key[:12]}"
                why = f"ran run {run_id}: {reason}"
        self.runs[step] = run_id
        mlflow.log_param(f"{step}_run_id", run_id)
        mlflow.set_tag(f"cache.{step}", why)
        print(f"{step}: {why}")  # noqa: T201 - progress a user reads in the `mlflow run` output
        return run_id


def main(args: argparse.Namespace) -> None:
    env_manager = check_env_manager(args.env_manager)
    forced = forced_steps(args.force)
    spec = resolve_model(args.model, args.revision)
    allow_pickle = parse_bool("allow_pickle", args.allow_pickle)
    generation = forward(args, GENERATION_OPTIONS)
    with mlflow.start_run(run_name=run_name("main", spec.name)) as parent:
        mlflow.set_tag(STEP_TAG, "main")
        step = StepRunner(parent, env_manager, forced)
        download = step(
            "download",
            {"model": args.model, "revision": args.revision, "allow_pickle": str(allow_pickle).lower()},
            {"source_revision": source_revision(spec.source, allow_pickle)},
        )
        after_download = {"download_run_id": download, "model": args.model, **generation}
        step("log_pipeline", {**after_download, "torch_dtype": args.torch_dtype}, {"download_run_id": download})
        onnx_params = {
            **after_download,
            "execution_provider": args.execution_provider,
            "onnx_source": args.onnx_source,
            "tracing": args.tracing,
            **forward(args, QUANTIZATION_OPTIONS),
        }
        step("log_onnx_wrapper", onnx_params, {"download_run_id": download})
        uris = {
            "pipeline": mlflow.get_run(step.runs["log_pipeline"]).data.tags[MODEL_URI_TAG],
            "onnx": mlflow.get_run(step.runs["log_onnx_wrapper"]).data.tags[MODEL_URI_TAG],
        }
        evaluation_params = {
            "pipeline_model_uri": uris["pipeline"],
            "onnx_model_uri": uris["onnx"],
            **forward(args, EVALUATION_OPTIONS),
        }
        evaluation = step("evaluate", evaluation_params, {**uris, "eval_set": eval_set_digest(args.eval_set)})
        evaluated = mlflow.get_run(evaluation).data
        gate = {
            key.split(".")[1]: value
            for key, value in evaluated.tags.items()
            if key.startswith("gate.") and key.count(".") == 1
        }
        summary = format_summary(
            parent.info.run_id, step.runs, uris, evaluated.metrics, gate, mlflow.get_tracking_uri()
        )
        mlflow.log_text(summary, "summary.txt")
    print(summary)  # noqa: T201 - the report `make run` ends with


def build_parser() -> argparse.ArgumentParser:
    """The step's command line; flags mirror the MLproject params with dashes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--revision", default="")
    parser.add_argument("--allow-pickle", default="false")
    parser.add_argument("--torch-dtype", default="auto")
    parser.add_argument("--execution-provider", default="cpu")
    parser.add_argument("--onnx-source", default="auto")
    parser.add_argument("--tracing", default="true")
    parser.add_argument("--force", default="false")
    add_options(parser, GENERATION_OPTIONS + EVALUATION_OPTIONS + QUANTIZATION_OPTIONS)
    parser.add_argument("--env-manager", default="local")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
