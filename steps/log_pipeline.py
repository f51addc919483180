"""Entry point `log_pipeline`: log the checkpoint as a transformers `llm/v1/chat` model; a GGUF
source's weights come from its file, float32 as transformers dequantizes them.

Params:
    download_run_id: the `download` run whose checkpoint to use; empty reuses the FINISHED
        `download` run of `model` with the same cache key as `main` would, or runs one.
    model: used only when download_run_id is empty.
    torch_dtype: auto (the checkpoint's own), float32, float16 or bfloat16.
    temperature: default sampling temperature; 0 means greedy, so evaluations repeat.
    max_new_tokens: default completion length for requests without max_tokens.
    env_manager: how to run `download` when it must run first.

Logs (tags `slmkit.step=log_pipeline`, `slmkit.cache_key`, `slmkit.source_key`, `slmkit.model_uri`):
    the model `model` (OpenAI-chat signature, pinned pip requirements; its recorded name is the
    download's `hub_repo_id` where it has one, else its `model_name`); tag
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

from slmkit.models.pipeline import build_pipeline, generation_config, pipeline_model_arguments
from slmkit.workflow.cache import StepRunner, step_run
from slmkit.workflow.cli import run_cli
from slmkit.workflow.databricks import publish_task_value
from slmkit.workflow.lineage import (
    download_checkpoint,
    download_gguf,
    get_download_run,
    scratch_dir,
    writing_artifacts,
)
from slmkit.workflow.steps import MODEL_URI_TAG, STEPS

MODEL_NAME = "model"


def main(args: argparse.Namespace) -> None:
    generation = generation_config(args.temperature, args.max_new_tokens)
    values = StepRunner(args.env_manager).fill_inputs("log_pipeline", STEPS["log_pipeline"].values(vars(args)))
    download = get_download_run(values["download_run_id"])
    with step_run("log_pipeline", values, download.model_name), scratch_dir("pipeline") as scratch:
        mlflow.set_tags(download.lineage_tags())
        mlflow.log_param("resolved_revision", download.revision)
        checkpoint, manifest = download_checkpoint(download.run_id, scratch)
        gguf = download_gguf(download.run_id, manifest, scratch)
        pipeline = build_pipeline(checkpoint, args.torch_dtype, download.recorded_name or checkpoint.name, gguf)
        started = time.perf_counter()
        with writing_artifacts("the pipeline model"):
            info = mlflow.transformers.log_model(
                name=MODEL_NAME, **pipeline_model_arguments(pipeline, generation, download.license)
            )
        # The checkpoint's bytes; a GGUF source's holds no weights, so add the float ones logged here.
        weights = pipeline.model.get_memory_footprint(return_buffers=False) if gguf else 0
        mlflow.log_metrics(
            {"log_seconds": time.perf_counter() - started, "model_size_bytes": manifest["total_bytes"] + weights}
        )
        mlflow.log_param("torch_dtype_loaded", str(pipeline.model.dtype).removeprefix("torch."))
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        publish_task_value(STEPS["log_pipeline"].hands_on, info.model_uri)


if __name__ == "__main__":
    run_cli(main, STEPS["log_pipeline"].build_parser(__doc__))
