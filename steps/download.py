"""Entry point `download`: fetch a model source, pin its revision, checksum it, log it.

Params:
    model: a preset from config/presets.yaml, a local checkpoint folder, a local .gguf file,
        or a hub repo id.
    revision: hub branch, tag or commit; empty keeps the preset's.
    allow_pickle: "true" accepts a source whose only weights are pickled (`.bin`, `.pt`) and
        converts them to safetensors here; unpickling can run code hidden in the file, so only
        for sources you trust. Default "false" refuses such sources.
    chat_template: a Jinja file, or a preset whose template to use, for both models' prompts;
        empty keeps the checkpoint's own, else the preset's. A checkpoint left without one is
        refused (slmkit.sources.chat_templates).

Logs (run tags `slmkit.step=download`, `slmkit.cache_key`, `slmkit.source_key`, `slmkit.resolved_revision`,
`slmkit.manifest_sha256`):
    artifacts `checkpoint/` (safetensors, config, tokenizer, chat template; for a GGUF source no
    weights), for GGUF sources `gguf/<file>.gguf` (the source file itself, which holds the weights
    of both models: the pipeline loads it, the ONNX build carries its quantized blocks over), and
    `manifest.json` (source, resolved revision, each file's size and sha256, the GGUF under
    `gguf`); params `model_name`, `license` (the preset's; empty when unknown), `hub_repo_id` (the
    repo the weights come from, where known: the pipeline model's recorded name),
    `chat_template_from` (`checkpoint`, or the template file put in), `source.*`,
    `resolved_revision`; metrics `checkpoint_bytes`, `download_seconds`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow

from slmkit.manifest import MANIFEST_NAME, build_manifest, describe_files, file_sha256, write_manifest
from slmkit.sources.chat_templates import settle_chat_template
from slmkit.sources.checkpoint import fetch_checkpoint
from slmkit.sources.presets import load_presets, resolve_model, source_params
from slmkit.workflow.cache import step_run, tag_download_key
from slmkit.workflow.cli import parse_bool, run_cli
from slmkit.workflow.databricks import publish_task_value
from slmkit.workflow.lineage import CHECKPOINT_ARTIFACT, GGUF_ARTIFACT, scratch_dir, source_key, writing_artifacts
from slmkit.workflow.steps import MANIFEST_SHA_TAG, REVISION_TAG, SOURCE_KEY_TAG, STEPS


def main(args: argparse.Namespace) -> None:
    spec = resolve_model(args.model, args.revision)
    allow_pickle = parse_bool("allow_pickle", args.allow_pickle)
    values = STEPS["download"].values(vars(args))
    with step_run("download", values, spec.name) as run, scratch_dir("download") as scratch:
        mlflow.set_tag(SOURCE_KEY_TAG, source_key(spec))
        mlflow.log_params(
            {"model_name": spec.name, "license": spec.license, "hub_repo_id": spec.hub_repo_id}
            | source_params(spec.source)
        )
        checkpoint, gguf = Path(scratch) / CHECKPOINT_ARTIFACT, Path(scratch) / GGUF_ARTIFACT
        checkpoint.mkdir()
        started = time.perf_counter()
        revision = fetch_checkpoint(spec.source, checkpoint, allow_pickle, gguf)
        mlflow.log_param(
            "chat_template_from",
            settle_chat_template(checkpoint, args.chat_template, spec.chat_template, load_presets()),
        )
        tag_download_key(values, revision)
        manifest = build_manifest(checkpoint, source_params(spec.source), revision)
        if gguf.is_dir():
            manifest[GGUF_ARTIFACT] = describe_files(gguf)
        write_manifest(Path(scratch) / MANIFEST_NAME, manifest)
        mlflow.log_metrics(
            {"checkpoint_bytes": manifest["total_bytes"], "download_seconds": time.perf_counter() - started}
        )
        with writing_artifacts("the checkpoint"):
            mlflow.log_artifacts(str(checkpoint), CHECKPOINT_ARTIFACT)
            if gguf.is_dir():
                mlflow.log_artifacts(str(gguf), GGUF_ARTIFACT)
            # The manifest goes last: a run without it never finished logging its checkpoint.
            mlflow.log_artifact(str(Path(scratch) / MANIFEST_NAME))
        mlflow.log_param("resolved_revision", revision)
        mlflow.set_tags({REVISION_TAG: revision, MANIFEST_SHA_TAG: file_sha256(Path(scratch) / MANIFEST_NAME)})
        publish_task_value(STEPS["download"].hands_on, run.info.run_id)


if __name__ == "__main__":
    run_cli(main, STEPS["download"].build_parser(__doc__))
