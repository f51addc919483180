"""Entry point `log_pipeline`: log the checkpoint as a transformers `llm/v1/chat` model.

Params:
    download_run_id: the `download` run whose checkpoint to use; empty finds or runs one for
        `model`.
    model: used only when download_run_id is empty.
    torch_dtype: auto (the checkpoint's own), float32, float16 or bfloat16.
    temperature: default sampling temperature; 0 means greedy, so evaluations repeat.
    max_new_tokens: default completion length for requests without max_tokens.
    env_manager: how to run `download` when it must run first.

Logs (tags `slmkit.step=log_pipeline`, `slmkit.source_key`, `slmkit.model_uri`):
    the model `model` (OpenAI-chat signature, pinned pip requirements); tag
    `slmkit.download_run_id`; params `resolved_revision`, the generation defaults (from `model_config`); metrics `model_size_bytes`,
    `log_seconds`.
"""

from __future__ import annotations

import argparse
import os
import time

# The checkpoint is local: stop the transformers flavor from asking the hub for a model card.
os.environ["HF_HUB_OFFLINE"] = "1"

import mlflow

from slmkit.databricks import PIPELINE_MODEL_URI, publish_task_value
from slmkit.lineage import (
    MODEL_URI_TAG,
    STEP_TAG,
    download_checkpoint,
    run_name,
    scratch_dir,
    upstream_download,
    writing_artifacts,
)
from slmkit.pipeline_model import build_pipeline, check_dtype, generation_config, pipeline_model_arguments
from slmkit.step_cli import GENERATION_OPTIONS, add_options, run_cli

MODEL_NAME = "model"


def main(args: argparse.Namespace) -> None:
    check_dtype(args.torch_dtype)
    generation = generation_config(args.temperature, args.max_new_tokens)
    download = upstream_download(args.download_run_id, args.model, args.env_manager)
    with mlflow.start_run(run_name=run_name("log_pipeline", download.model_name)), scratch_dir("pipeline") as scratch:
        mlflow.set_tags({STEP_TAG: "log_pipeline", **download.lineage_tags()})
        mlflow.log_param("resolved_revision", download.revision)
        checkpoint, manifest = download_checkpoint(download.run_id, scratch)
        pipeline = build_pipeline(checkpoint, args.torch_dtype, download.model_name or checkpoint.name)
        started = time.perf_counter()
        with writing_artifacts("the pipeline model"):
            info = mlflow.transformers.log_model(name=MODEL_NAME, **pipeline_model_arguments(pipeline, generation))
        mlflow.log_metrics({"log_seconds": time.perf_counter() - started, "model_size_bytes": manifest["total_bytes"]})
        mlflow.log_param("torch_dtype_loaded", str(pipeline.model.dtype).removeprefix("torch."))
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        publish_task_value(PIPELINE_MODEL_URI, info.model_uri)


def build_parser() -> argparse.ArgumentParser:
    """The step's command line; flags mirror the MLproject params with dashes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download-run-id", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--torch-dtype", default="auto")
    add_options(parser, GENERATION_OPTIONS)
    parser.add_argument("--env-manager", default="local")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
