"""Entry point `evaluate`: measure both models on one eval set, register them, gate `champion`.

Params:
    pipeline_model_uri, onnx_model_uri: the models to compare (`models:/…` or `runs:/…`);
        empty finds the newest finished run of that step for `model`, or runs it.
    model: used only to find or make missing models.
    eval_set: JSONL of {"messages": [...], "answers": [...]}: a path (relative to the project
        folder) or an artifact URI (`runs:/…`, `s3://…`, …).
    max_rows: evaluate only the first rows (0: all); max_tokens: completion length per answer.
    pipeline_registered_model, onnx_registered_model: registry names (`catalog.schema.model`
        for Unity Catalog); empty skips registering that model.
    min_correct_rate, max_regression, min_parity: the promotion gate (slmkit.promotion).
    fail_on_gate: `true` makes a failed gate fail the run, for CI-style use.
    engine: `local` answers every row in process; `spark` takes the answers (quality, parity)
        from the batch path (`mlflow.pyfunc.spark_udf`, as `batch_infer`) and times the first
        32 rows in process (latency, speed, memory); metric `<model>/engine_agreement_rate`.
    env_manager: how to run a missing upstream step.

Logs (tag `slmkit.step=evaluate`): the eval set as a dataset input; one nested run per model
scored with `mlflow.genai.evaluate` (per-row traces, `<scorer>/mean`); metrics `pipeline/*`,
`onnx/*` and `parity/*`; artifacts `eval_results.json` (per-row table), `comparison.md`,
`plots/latency.png`, `plots/overview.png`; tags `gate.<model>` with the gate's decision.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import mlflow
import pandas as pd

from slmkit.errors import UserError
from slmkit.evaluation import (
    EvalRow,
    answer_agreement,
    eval_set_path,
    is_artifact_uri,
    load_eval_set,
    parity,
    rows_table,
    scored,
    summarize,
    timed_results,
    with_timings,
)
from slmkit.lineage import (
    DOWNLOAD_RUN_TAG,
    MANIFEST_SHA_TAG,
    MODEL_URI_TAG,
    REVISION_TAG,
    STEP_TAG,
    ensure_step_run,
    logged_model_name,
    model_run,
    run_name,
    scratch_dir,
)
from slmkit.measure import measure_in_subprocess
from slmkit.presets import resolve_model
from slmkit.promotion import (
    CHAMPION,
    QUALITY_METRICS,
    GateDecision,
    GatePolicy,
    champion_version,
    check_registered_name,
    decide,
    promote,
    register_candidate,
)
from slmkit.report import comparison_markdown, latency_figure, overview_figure
from slmkit.scorers import score_with_genai
from slmkit.spark_batch import answer_eval_rows, check_engine, spark_session
from slmkit.step_cli import EVALUATION_OPTIONS, add_options, parse_bool, positive_int, run_cli

STEPS = {"pipeline": "log_pipeline", "onnx": "log_onnx_wrapper"}
# engine=spark: rows timed in process (latency, speed, memory); answers for all rows come from Spark.
TIMING_ROWS = 32
SPARK_PARTITIONS = 2
RESULTS_TABLE = "eval_results.json"
EVAL_FINGERPRINT_TAG = "eval.fingerprint"


def model_uri(given: str, step: str, model: str, env_manager: str) -> str:
    """The URI given, or the model of the newest finished `step` run for `model`."""
    if given:
        return given
    spec = resolve_model(model)
    run_id = ensure_step_run(step, spec, {"model": model, "env_manager": env_manager}, env_manager)
    return mlflow.get_run(run_id).data.tags[MODEL_URI_TAG]


def eval_set_file(value: str, scratch: Path) -> Path:
    """A local copy of the eval set: artifact URIs are downloaded, paths resolved from the project."""
    if not is_artifact_uri(value):
        return eval_set_path(value)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=value, dst_path=str(scratch)))
    except Exception as error:  # any store's failure: S3, HTTP, a missing run
        raise UserError(f"eval_set={value!r}: cannot download it ({error})") from error


def eval_dataset(rows: list[EvalRow], source: str) -> mlflow.data.pandas_dataset.PandasDataset:
    frame = pd.DataFrame([{"id": r.row_id, "messages": r.messages, "answers": r.answers} for r in rows])
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local artifact source twice and warns that the path is
        # ambiguous between the two; either reads the same file.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_pandas(frame, source=source, name=Path(source).stem)


def version_tags(uri: str, metrics: dict[str, float], fingerprint: str) -> dict[str, str]:
    """Tags a registered version carries: where it came from and how it scored."""
    tags = model_run(uri).data.tags
    lineage = {
        "source_key": tags.get("slmkit.source_key", ""),
        "resolved_revision": tags.get(REVISION_TAG, ""),
        "manifest_sha256": tags.get(MANIFEST_SHA_TAG, ""),
        "download_run_id": tags.get(DOWNLOAD_RUN_TAG, ""),
        "git_commit": tags.get("mlflow.source.git.commit", ""),
        EVAL_FINGERPRINT_TAG: fingerprint,
    }
    return {**lineage, **{f"eval.{key}": f"{value:.6g}" for key, value in metrics.items()}}


def champion_metrics(
    name: str, rows: list[EvalRow], fingerprint: str, max_tokens: int, scratch: Path
) -> tuple[str, dict[str, float]] | None:
    """The champion's quality on this eval set: from its tags if it was scored on the same
    rows and settings, else measured now, so the comparison is always like for like."""
    champion = champion_version(name)
    if champion is None:
        return None
    if champion.tags.get(EVAL_FINGERPRINT_TAG) == fingerprint:
        return champion.version, {m: float(champion.tags[f"eval.{m}"]) for m in QUALITY_METRICS}
    measured = measure_in_subprocess(f"models:/{name}@{CHAMPION}", rows, max_tokens, scratch)
    return champion.version, summarize(measured.results)


def main(args: argparse.Namespace) -> None:
    positive_int("max_tokens", args.max_tokens)
    check_engine(args.engine)
    fail_on_gate = parse_bool("fail_on_gate", args.fail_on_gate)
    names = {
        "pipeline": check_registered_name(args.pipeline_registered_model, "pipeline_registered_model"),
        "onnx": check_registered_name(args.onnx_registered_model, "onnx_registered_model"),
    }
    policies = {
        "pipeline": GatePolicy(args.min_correct_rate, args.max_regression),
        "onnx": GatePolicy(args.min_correct_rate, args.max_regression, args.min_parity),
    }
    with scratch_dir("evaluate") as scratch_name:
        scratch = Path(scratch_name)
        rows = load_eval_set(eval_set_file(args.eval_set, scratch), args.max_rows)
        uris = {
            name: model_uri(getattr(args, f"{name}_model_uri"), step, args.model, args.env_manager)
            for name, step in STEPS.items()
        }
        dataset = eval_dataset(rows, args.eval_set)
        fingerprint = f"{dataset.digest}:rows={len(rows)}:max_tokens={args.max_tokens}"
        with mlflow.start_run(run_name=run_name("evaluate", logged_model_name(uris["onnx"]))):
            mlflow.set_tag(STEP_TAG, "evaluate")
            mlflow.log_input(dataset, context="evaluation")
            mlflow.log_params({"eval_rows": len(rows), "eval_fingerprint": fingerprint})
            mlflow.log_params({f"{name}_model_uri_used": uri for name, uri in uris.items()})
            measurements, metrics = {}, {}
            spark = spark_session(SPARK_PARTITIONS) if args.engine == "spark" else None
            for name, uri in uris.items():
                # With Spark, answers come from the batch path and timings from TIMING_ROWS rows in process.
                timed_rows = rows[:TIMING_ROWS] if spark else rows
                measurements[name] = measure_in_subprocess(uri, timed_rows, args.max_tokens, scratch)
                if spark:
                    responses = answer_eval_rows(spark, uri, rows, args.max_tokens, scratch / name, SPARK_PARTITIONS)
                    answered = [scored(row, response) for row, response in zip(rows, responses, strict=True)]
                    metrics[f"{name}/engine_agreement_rate"] = answer_agreement(measurements[name].results, answered)
                    measurements[name] = replace(
                        measurements[name], results=with_timings(answered, measurements[name].results)
                    )
                model_metrics = {**summarize(measurements[name].results), **measurements[name].size_metrics()}
                model_metrics.update(score_with_genai(name, rows, measurements[name].results))
                metrics.update({f"{name}/{key}": value for key, value in model_metrics.items()})
            parity_metrics = parity(measurements["pipeline"].results, measurements["onnx"].results)
            metrics.update({f"parity/{key}": value for key, value in parity_metrics.items()})
            mlflow.log_metrics(metrics)
            mlflow.log_table(rows_table(rows, {n: m.results for n, m in measurements.items()}), RESULTS_TABLE)
            mlflow.log_figure(
                latency_figure({n: [r.latency_s for r in timed_results(m.results)] for n, m in measurements.items()}),
                "plots/latency.png",
            )
            mlflow.log_figure(overview_figure(metrics), "plots/overview.png")

            decisions: dict[str, GateDecision] = {}
            for name, registered in names.items():
                if not registered:
                    continue
                own = summarize(measurements[name].results)
                champion = champion_metrics(registered, rows, fingerprint, args.max_tokens, scratch)
                decision = decide(
                    own, champion[1] if champion else None, parity_metrics if name == "onnx" else None, policies[name]
                )
                version = register_candidate(uris[name], registered, version_tags(uris[name], own, fingerprint))
                if decision.passed:
                    promote(registered, version.version)
                decisions[name] = decision
                summary = f"{registered} v{version.version} {decision.describe()}"
                if champion:
                    summary += f" (compared with champion v{champion[0]})"
                mlflow.set_tags({f"gate.{name}": summary[:5000], f"gate.{name}.passed": str(decision.passed).lower()})
                print(f"promotion gate {name}: {summary}")  # noqa: T201 - the step's report to the user
            gate_text = {name: d.describe() for name, d in decisions.items()}
            mlflow.log_text(comparison_markdown(metrics, uris, gate_text, len(rows)), "comparison.md")
            failed = [name for name, decision in decisions.items() if not decision.passed]
            if fail_on_gate and failed:
                raise UserError(
                    f"promotion gate failed for {', '.join(failed)} and fail_on_gate=true; see the gate.* tags"
                )


def build_parser() -> argparse.ArgumentParser:
    """The step's command line; flags mirror the MLproject params with dashes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline-model-uri", default="")
    parser.add_argument("--onnx-model-uri", default="")
    parser.add_argument("--model", default="")
    add_options(parser, EVALUATION_OPTIONS)
    parser.add_argument("--env-manager", default="local")
    parser.add_argument("--engine", default="local")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
