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
from slmkit.step_cli import run_cli
from slmkit.summary import format_summary


def main(args: argparse.Namespace) -> None:
    env_manager = check_env_manager(args.env_manager)
    generation = {"temperature": str(args.temperature), "max_new_tokens": str(args.max_new_tokens)}
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
                "eval_set": args.eval_set,
                "max_rows": str(args.max_rows),
                "max_tokens": str(args.max_tokens),
                "pipeline_registered_model": args.pipeline_registered_model,
                "onnx_registered_model": args.onnx_registered_model,
                "min_correct_rate": str(args.min_correct_rate),
                "max_regression": str(args.max_regression),
                "min_parity": str(args.min_parity),
                "fail_on_gate": args.fail_on_gate,
                "env_manager": env_manager,
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
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--eval-set", default="data/eval_set.jsonl")
    parser.add_argument("--max-rows", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pipeline-registered-model", default="slm-chat-pipeline")
    parser.add_argument("--onnx-registered-model", default="slm-chat-onnx")
    parser.add_argument("--min-correct-rate", type=float, default=0.0)
    parser.add_argument("--max-regression", type=float, default=0.05)
    parser.add_argument("--min-parity", type=float, default=0.0)
    parser.add_argument("--fail-on-gate", default="false")
    parser.add_argument("--env-manager", default="local")
    run_cli(main, parser)
