"""Entry point `main`: download → log_pipeline → log_onnx_wrapper → evaluate, as child runs.

Each step runs with `mlflow.projects.run` under this parent run, with the env manager passed
on explicitly, and receives its inputs as run ids and model URIs only. The parent records each
child's run id as the param `<step>_run_id` and prints a summary at the end.

Params: the union of the steps' params (see MLproject); `env_manager` is passed to every child.
"""

from __future__ import annotations

import argparse

import mlflow

from slmkit.lineage import MODEL_URI_TAG, STEP_TAG, check_env_manager, run_entry_point
from slmkit.step_cli import EVALUATION_OPTIONS, GENERATION_OPTIONS, add_options, forward, run_cli
from slmkit.summary import format_summary


def main(args: argparse.Namespace) -> None:
    env_manager = check_env_manager(args.env_manager)
    generation = forward(args, GENERATION_OPTIONS)
    with mlflow.start_run() as parent:
        mlflow.set_tag(STEP_TAG, "main")
        runs: dict[str, str] = {}

        def child(step: str, parameters: dict[str, str]) -> str:
            runs[step] = run_entry_point(step, parameters, env_manager, parent.info.experiment_id)
            mlflow.log_param(f"{step}_run_id", runs[step])
            return runs[step]

        download = child("download", {"model": args.model, "revision": args.revision})
        common = {"download_run_id": download, "model": args.model, "env_manager": env_manager, **generation}
        child("log_pipeline", {**common, "torch_dtype": args.torch_dtype})
        child(
            "log_onnx_wrapper",
            {**common, "execution_provider": args.execution_provider, "onnx_source": args.onnx_source},
        )
        uris = {
            "pipeline": mlflow.get_run(runs["log_pipeline"]).data.tags[MODEL_URI_TAG],
            "onnx": mlflow.get_run(runs["log_onnx_wrapper"]).data.tags[MODEL_URI_TAG],
        }
        evaluation = child(
            "evaluate",
            {
                "pipeline_model_uri": uris["pipeline"],
                "onnx_model_uri": uris["onnx"],
                "env_manager": env_manager,
                **forward(args, EVALUATION_OPTIONS),
            },
        )
        evaluated = mlflow.get_run(evaluation).data
        gate = {
            key.split(".")[1]: value
            for key, value in evaluated.tags.items()
            if key.startswith("gate.") and key.count(".") == 1
        }
        summary = format_summary(parent.info.run_id, runs, uris, evaluated.metrics, gate, mlflow.get_tracking_uri())
        mlflow.log_text(summary, "summary.txt")
    print(summary)  # noqa: T201 - the report `make run` ends with


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--revision", default="")
    parser.add_argument("--torch-dtype", default="auto")
    parser.add_argument("--execution-provider", default="cpu")
    parser.add_argument("--onnx-source", default="auto")
    add_options(parser, GENERATION_OPTIONS + EVALUATION_OPTIONS)
    parser.add_argument("--env-manager", default="local")
    run_cli(main, parser)
