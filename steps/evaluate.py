"""Entry point `evaluate`: run both logged models on the eval set and log quality, parity, speed.

Params:
    pipeline_model_uri, onnx_model_uri: the models to compare (`models:/…` or `runs:/…`);
        empty finds the newest finished run of that step for `model`, or runs it.
    model: used only to find or make missing models.
    eval_set: JSONL of {"messages": [...], "answers": [...]}; relative paths are taken from
        the project folder.
    max_rows: evaluate only the first rows (0: all); keeps a CPU run of a 3.8B model affordable.
    max_tokens: completion length per answer.
    env_manager: how to run a missing upstream step.

Logs (tag `slmkit.step=evaluate`): metrics `pipeline/*` and `onnx/*` from
slmkit.evaluation.summarize, `parity/*` (ONNX against the pipeline, greedy), the table
`eval_results.json` with each question and both answers; params `eval_rows`, `*_model_uri`.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import mlflow

from slmkit import PROJECT_ROOT
from slmkit.evaluation import evaluate_model, load_eval_set, parity, rows_table, summarize
from slmkit.lineage import MODEL_URI_TAG, STEP_TAG, ensure_step_run
from slmkit.presets import resolve_model
from slmkit.step_cli import positive_int, run_cli

MODELS = {"pipeline": "log_pipeline", "onnx": "log_onnx_wrapper"}
RESULTS_TABLE = "eval_results.json"


def model_uri(given: str, step: str, model: str, env_manager: str) -> str:
    """The URI given, or the model of the newest finished `step` run for `model`."""
    if given:
        return given
    spec = resolve_model(model)
    run_id = ensure_step_run(step, spec, {"model": model, "env_manager": env_manager}, env_manager)
    return mlflow.get_run(run_id).data.tags[MODEL_URI_TAG]


def main(args: argparse.Namespace) -> None:
    positive_int("max_tokens", args.max_tokens)
    eval_set = Path(args.eval_set) if Path(args.eval_set).is_absolute() else PROJECT_ROOT / args.eval_set
    rows = load_eval_set(eval_set, args.max_rows)
    uris = {
        "pipeline": model_uri(args.pipeline_model_uri, "log_pipeline", args.model, args.env_manager),
        "onnx": model_uri(args.onnx_model_uri, "log_onnx_wrapper", args.model, args.env_manager),
    }
    with mlflow.start_run():
        mlflow.set_tag(STEP_TAG, "evaluate")
        mlflow.log_params({"eval_rows": len(rows), **{f"{name}_model_uri_used": uri for name, uri in uris.items()}})
        results = {}
        for name, uri in uris.items():
            model = mlflow.pyfunc.load_model(uri)
            results[name] = evaluate_model(model.predict, rows, args.max_tokens)
            mlflow.log_metrics({f"{name}/{key}": value for key, value in summarize(results[name]).items()})
            del model
            gc.collect()
        mlflow.log_metrics(
            {f"parity/{key}": value for key, value in parity(results["pipeline"], results["onnx"]).items()}
        )
        mlflow.log_table(rows_table(rows, results), RESULTS_TABLE)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline-model-uri", default="")
    parser.add_argument("--onnx-model-uri", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--eval-set", default="data/eval_set.jsonl")
    parser.add_argument("--max-rows", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--env-manager", default="local")
    run_cli(main, parser)
