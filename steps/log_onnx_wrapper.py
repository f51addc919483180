"""Entry point `log_onnx_wrapper`: an int4 ONNX build wrapped as a models-from-code chat pyfunc.

Params:
    model: a preset; its ready ONNX variant on the hub is used when it has one.
    download_run_id: the `download` run to build from; empty finds or runs one for `model`.
    execution_provider: cpu or cuda; picks the hub variant's subfolder or the builder's target.
    onnx_source: auto (the hub variant when the preset has one, else build), hub, or build.
    temperature, max_new_tokens: the wrapper's defaults, as for `log_pipeline`.
    tracing: `true` records an MLflow trace per request (prompt and decode spans), `false` not.
    env_manager: how to run `download` when it must run first.

Logs (tags `slmkit.step=log_onnx_wrapper`, `slmkit.source_key`, `slmkit.model_uri`):
    the model `model`: wrappers/onnx_chat_model.py as code, the ONNX folder as artifact
    `onnx_model` with its `manifest.json`, the chat signature, an input example, and pip
    requirements without torch; params `onnx_origin`, `onnx_revision`; metrics
    `model_size_bytes`, `build_seconds`, `log_seconds`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow

from slmkit.databricks import ONNX_MODEL_URI, publish_task_value
from slmkit.errors import UserError
from slmkit.lineage import (
    MODEL_URI_TAG,
    SOURCE_KEY_TAG,
    STEP_TAG,
    download_checkpoint,
    scratch_dir,
    source_key,
    upstream_download,
    writing_artifacts,
)
from slmkit.onnx_build import build_int4, fetch_ready_variant
from slmkit.onnx_wrapper_model import seal_onnx_folder, wrapper_model_arguments
from slmkit.pipeline_model import generation_config
from slmkit.presets import ModelSpec, check_execution_provider, load_presets, resolve_model
from slmkit.step_cli import GENERATION_OPTIONS, add_options, parse_bool, run_cli

ONNX_SOURCES = ("auto", "hub", "build")


def use_hub_variant(spec: ModelSpec | None, onnx_source: str, execution_provider: str) -> bool:
    """Whether to fetch the preset's ready ONNX build instead of building one."""
    if onnx_source not in ONNX_SOURCES:
        raise UserError(f"onnx_source={onnx_source!r}: choose one of {', '.join(ONNX_SOURCES)}")
    available = spec is not None and spec.onnx is not None and execution_provider in spec.onnx.subfolders
    if onnx_source == "hub" and not available:
        raise UserError(
            f"onnx_source=hub: the model has no ready ONNX variant for {execution_provider}; use onnx_source=build"
        )
    return onnx_source == "hub" or (onnx_source == "auto" and available)


def main(args: argparse.Namespace) -> None:
    check_execution_provider(args.execution_provider)
    tracing = parse_bool("tracing", args.tracing)
    generation = generation_config(args.temperature, args.max_new_tokens)
    preset = args.model if args.model in load_presets() else ""
    spec = resolve_model(preset) if preset else None
    from_hub = use_hub_variant(spec, args.onnx_source, args.execution_provider)
    download = None if from_hub else upstream_download(args.download_run_id, args.model, args.env_manager)
    with mlflow.start_run(), scratch_dir("onnx") as scratch:
        onnx_dir = Path(scratch) / "onnx_model"
        started = time.perf_counter()
        if from_hub:
            mlflow.set_tags({STEP_TAG: "log_onnx_wrapper", SOURCE_KEY_TAG: source_key(spec)})
            revision = fetch_ready_variant(spec.onnx, args.execution_provider, onnx_dir)
            origin = f"hub:{spec.onnx.repo_id}/{spec.onnx.subfolders[args.execution_provider]}"
        else:
            mlflow.set_tags({STEP_TAG: "log_onnx_wrapper", **download.lineage_tags()})
            checkpoint, _ = download_checkpoint(download.run_id, Path(scratch))
            build_int4(checkpoint, onnx_dir, Path(scratch), args.execution_provider)
            revision, origin = download.revision, f"built-int4-from:{download.run_id}"
        manifest = seal_onnx_folder(onnx_dir, origin, revision)
        mlflow.log_params({"onnx_origin": origin, "onnx_revision": revision})
        mlflow.log_metric("build_seconds", time.perf_counter() - started)
        started = time.perf_counter()
        model_name = Path(download.model if download else preset).name
        with writing_artifacts("the ONNX wrapper model"):
            info = mlflow.pyfunc.log_model(
                name="model",
                **wrapper_model_arguments(onnx_dir, model_name, generation, args.execution_provider, tracing),
            )
        mlflow.log_metrics({"log_seconds": time.perf_counter() - started, "model_size_bytes": manifest["total_bytes"]})
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        publish_task_value(ONNX_MODEL_URI, info.model_uri)


def build_parser() -> argparse.ArgumentParser:
    """The step's command line; flags mirror the MLproject params with dashes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="")
    parser.add_argument("--download-run-id", default="")
    parser.add_argument("--execution-provider", default="cpu")
    parser.add_argument("--onnx-source", default="auto")
    parser.add_argument("--tracing", default="true")
    add_options(parser, GENERATION_OPTIONS)
    parser.add_argument("--env-manager", default="local")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
