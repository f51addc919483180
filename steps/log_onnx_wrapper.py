"""Entry point `log_onnx_wrapper`: an int4 ONNX build wrapped as a models-from-code chat pyfunc.

Params:
    model: a preset; its ready ONNX variant on the hub is used when it has one.
    download_run_id: the `download` run to build from; empty reuses the FINISHED `download`
        run of `model` with the same cache key as `main` would, or runs one.
    execution_provider: cpu or cuda; picks the hub variant's subfolder or the builder's target.
    onnx_source: auto (the hub variant when the preset has one and quantization is int4, else
        build), hub, or build.
    quantization: gguf, int4, int4-kquant, int8, fp32, fp16/bf16 (cuda) or auto; empty takes the
        preset's (config/presets.yaml): gguf for GGUF sources, int4 otherwise.
    calibration_set, calibration_rows, min_top1_agreement: for quantization=auto, the rows whose
        float answers (with the shipped text) the candidates are teacher-forced along, and the
        share of positions whose top-1 token must be the float model's for a build to be kept.
    temperature, max_new_tokens: the wrapper's defaults, as for `log_pipeline`.
    tracing: `true` records an MLflow trace per request (prompt and decode spans), `false` not.
    env_manager: how to run `download` when it must run first.

Logs (tags `slmkit.step=log_onnx_wrapper`, `slmkit.cache_key`, `slmkit.source_key`, `slmkit.model_uri`):
    the model `model`: wrappers/onnx_chat_model.py as code, the ONNX folder as artifact
    `onnx_model` with its `manifest.json`, the chat signature, an input example, and pip
    requirements without torch; params `onnx_origin`, `onnx_revision`, `onnx_quantization` (the one
    built); for gguf the param `gguf_tensors` (carried and re-quantized counts) and the artifact
    `gguf_tensors.tsv` (each MatMul node, carried with its GGUF types or re-quantized and why);
    for auto the table `quantization_candidates.json` (each candidate's top-1 agreement, KLD,
    answers and speed), `plots/quantization_quality_speed.png` and the metrics
    `calibration/reference_correct_rate` and `calibration/fidelity_positions`;
    metrics `model_size_bytes`, `build_seconds`, `log_seconds`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import mlflow

from slmkit.errors import UserError, check_choice
from slmkit.evaluation.fidelity import MIN_POSITIONS
from slmkit.evaluation.quantization_choice import AutoChoice, auto_quantization, calibrate, good_enough
from slmkit.evaluation.report import quality_speed_figure
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT, seal_onnx_folder, wrapper_model_arguments
from slmkit.models.pipeline import generation_config
from slmkit.onnx.build import AUTO, build_onnx, check_quantization, fetch_ready_variant
from slmkit.sources.eval_set import eval_set_path, load_eval_set
from slmkit.sources.presets import (
    ONNX_SOURCES,
    ModelSpec,
    default_quantization,
    load_presets,
    resolve_model,
)
from slmkit.workflow.cache import StepRunner, step_run
from slmkit.workflow.cli import parse_bool, run_cli
from slmkit.workflow.databricks import publish_task_value
from slmkit.workflow.lineage import (
    download_checkpoint,
    download_gguf,
    get_download_run,
    scratch_dir,
    source_key,
    writing_artifacts,
)
from slmkit.workflow.steps import MODEL_URI_TAG, SOURCE_KEY_TAG, STEPS

logger = logging.getLogger(__name__)
HUB_QUANTIZATION = "int4"  # the presets' ready hub builds are int4 RTN, block 32
CALIBRATION_MAX_TOKENS = 64
GGUF_REPORT = "gguf_tensors.tsv"
CANDIDATES_TABLE = "quantization_candidates.json"
CANDIDATES_PLOT = "plots/quantization_quality_speed.png"


def use_hub_variant(spec: ModelSpec | None, onnx_source: str, execution_provider: str, quantization: str) -> bool:
    """Whether to fetch the preset's ready ONNX build (int4) instead of building one."""
    check_choice("onnx_source", onnx_source, ONNX_SOURCES)
    available = spec is not None and spec.onnx is not None and execution_provider in spec.onnx.subfolders
    if onnx_source == "hub" and not available:
        raise UserError(
            f"onnx_source=hub: the model has no ready ONNX variant for {execution_provider}; use onnx_source=build"
        )
    if onnx_source == "hub" and quantization != HUB_QUANTIZATION:
        raise UserError(
            f"onnx_source=hub: the hub's ready build is {HUB_QUANTIZATION}, not quantization={quantization}; "
            "use onnx_source=build"
        )
    return onnx_source == "hub" or (onnx_source == "auto" and available and quantization == HUB_QUANTIZATION)


def log_auto_choice(choice: AutoChoice, min_top1_agreement: float) -> None:
    """Log every candidate `quantization=auto` tried, as a table and a fidelity-speed plot."""
    rows = [candidate.as_row() for candidate in choice.tried]
    mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, CANDIDATES_TABLE)
    mlflow.log_figure(quality_speed_figure(choice.tried, min_top1_agreement), CANDIDATES_PLOT)
    mlflow.log_metrics({"calibration/reference_correct_rate": choice.reference_correct_rate,
                        "calibration/fidelity_positions": choice.fidelity_positions})  # fmt: skip
    if not good_enough(choice.kept, min_top1_agreement):
        logger.warning(
            "quantization=auto: no candidate reaches min_top1_agreement=%s; kept the best", min_top1_agreement
        )
        mlflow.set_tag(
            "quantization.auto", f"no candidate reaches min_top1_agreement; kept the best, {choice.kept.quantization}"
        )


def main(args: argparse.Namespace) -> None:
    tracing = parse_bool("tracing", args.tracing)
    generation = generation_config(args.temperature, args.max_new_tokens)
    preset = args.model if args.model in load_presets() else ""
    spec = resolve_model(args.model) if args.model else None
    quantization = args.quantization or (spec.quantization if spec else "int4")
    from_gguf = spec is None or default_quantization(spec.source) == "gguf"
    check_quantization(quantization, args.execution_provider, from_gguf)
    from_hub = use_hub_variant(spec if preset else None, args.onnx_source, args.execution_provider, quantization)
    values = STEPS["log_onnx_wrapper"].values(vars(args))
    if not from_hub:
        values = StepRunner(args.env_manager).fill_inputs("log_onnx_wrapper", values)
    download = None if from_hub else get_download_run(values["download_run_id"])
    model_name = download.model_name if download else preset
    with step_run("log_onnx_wrapper", values, model_name), scratch_dir("onnx") as scratch:
        onnx_dir = Path(scratch) / ONNX_ARTIFACT
        started = time.perf_counter()
        report = None
        if from_hub:
            mlflow.set_tag(SOURCE_KEY_TAG, source_key(spec))
            revision = fetch_ready_variant(spec.onnx, args.execution_provider, onnx_dir)
            origin = f"hub:{spec.onnx.repo_id}/{spec.onnx.subfolders[args.execution_provider]}"
        else:
            mlflow.set_tags(download.lineage_tags())
            checkpoint, manifest = download_checkpoint(download.run_id, Path(scratch))
            gguf = download_gguf(download.run_id, manifest, Path(scratch))
            check_quantization(quantization, args.execution_provider, gguf is not None)
            if quantization == AUTO:
                rows = load_eval_set(eval_set_path(args.calibration_set), args.calibration_rows)
                calibration = calibrate(checkpoint, gguf, rows, CALIBRATION_MAX_TOKENS, MIN_POSITIONS)
                choice = auto_quantization(
                    checkpoint,
                    gguf,
                    Path(scratch),
                    args.execution_provider,
                    calibration,
                    args.min_top1_agreement,
                    CALIBRATION_MAX_TOKENS,
                )
                log_auto_choice(choice, args.min_top1_agreement)
                quantization, report = choice.kept.quantization, choice.report
                shutil.move(choice.folder, onnx_dir)
            else:
                report = build_onnx(quantization, checkpoint, onnx_dir, Path(scratch), args.execution_provider, gguf)
            revision, origin = download.revision, f"built-{quantization}-from:{download.run_id}"
        if report is not None:
            mlflow.log_param("gguf_tensors", report.counts())
            mlflow.log_text("\n".join(report.lines()) + "\n", GGUF_REPORT)
        manifest = seal_onnx_folder(onnx_dir, origin, revision)
        mlflow.log_params({"onnx_origin": origin, "onnx_revision": revision, "onnx_quantization": quantization})
        mlflow.log_metric("build_seconds", time.perf_counter() - started)
        started = time.perf_counter()
        with writing_artifacts("the ONNX wrapper model"):
            info = mlflow.pyfunc.log_model(
                name="model",
                **wrapper_model_arguments(onnx_dir, model_name, generation, args.execution_provider, tracing),
            )
        mlflow.log_metrics({"log_seconds": time.perf_counter() - started, "model_size_bytes": manifest["total_bytes"]})
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        publish_task_value(STEPS["log_onnx_wrapper"].hands_on, info.model_uri)


if __name__ == "__main__":
    run_cli(main, STEPS["log_onnx_wrapper"].build_parser(__doc__))
