"""Entry point `evaluate`: measure both models on one eval set, register them, gate `champion`.

Params:
    pipeline_model_uri, onnx_model_uri: the models to compare (`models:/…` or `runs:/…`);
        empty reuses the FINISHED run of that step for `model` with the same cache key as `main`
        would compute (the steps' default params, this code), or runs it.
    model: used only to find or make missing models.
    eval_set: JSONL of {"messages": [...], "answers": [...]}: a path (relative to the project
        folder) or an artifact URI (`runs:/…`, `s3://…`, …).
    max_rows: evaluate only the first rows (0: all); max_tokens: completion length per answer.
    fidelity_positions: at least this many positions for the ONNX model's fidelity to the float
        model (slmkit.evaluation.fidelity); each costs a float forward pass; 0 measures none.
    pipeline_registered_model, onnx_registered_model: registry names (`catalog.schema.model`
        for Unity Catalog); empty skips registering that model.
    min_correct_rate, max_regression, min_parity: the promotion gate (slmkit.evaluation.promotion);
        parity_metric: what min_parity applies to, exact_match_rate or top1_agreement.
    fail_on_gate: `true` makes a failed gate fail the run, for CI-style use.
    engine: `local` answers every row in process; `spark` takes the answers (quality, parity)
        from the batch path (`mlflow.pyfunc.spark_udf`, as `batch_infer`) and times the first
        32 rows in process (latency, speed, memory); metric `<model>/engine_agreement_rate`.
    env_manager: how to run a missing upstream step.

Logs (tags `slmkit.step=evaluate`, `slmkit.cache_key`): the eval set as a dataset input; one
nested run per model whose traces carry `mlflow.genai.evaluate`'s per-row assessments; metrics
(computed once, by slmkit.evaluation.scoring) `pipeline/*`,
`onnx/*` and `parity/*` (the answers' `exact_match_rate`, and the ONNX model's fidelity to the
float model, `top1_agreement` and `kl_divergence` over `fidelity_positions`, slmkit.evaluation.fidelity); artifacts `eval_results.json` (per-row table), `comparison.md`,
`plots/latency.png`, `plots/overview.png`; tags `gate.<model>` with the gate's decision.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import mlflow
import pandas as pd

from slmkit.errors import UserError
from slmkit.evaluation.compare import Evaluated, measure_models
from slmkit.evaluation.measure import measure_in_subprocess
from slmkit.evaluation.promotion import GatePolicy, check_gates, check_registered_name, gate_models
from slmkit.evaluation.report import comparison_markdown, latency_figure, overview_figure
from slmkit.evaluation.scoring import (
    rows_table,
    summarize,
    timed_results,
)
from slmkit.sources.eval_set import EvalRow, eval_set_path, is_artifact_uri, load_eval_set
from slmkit.workflow.cache import StepRunner, step_run
from slmkit.workflow.cli import parse_bool, positive_int, run_cli
from slmkit.workflow.lineage import logged_model_name, scratch_dir
from slmkit.workflow.steps import STEPS

MODELS = ("pipeline", "onnx")
RESULTS_TABLE = "eval_results.json"


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


def log_results(rows: list[EvalRow], evaluated: Evaluated) -> None:
    mlflow.log_metrics(evaluated.metrics)
    mlflow.log_table(rows_table(rows, {n: m.results for n, m in evaluated.measurements.items()}), RESULTS_TABLE)
    latencies = {n: [r.latency_s for r in timed_results(m.results)] for n, m in evaluated.measurements.items()}
    mlflow.log_figure(latency_figure(latencies), "plots/latency.png")
    mlflow.log_figure(overview_figure(evaluated.metrics), "plots/overview.png")


def main(args: argparse.Namespace) -> None:
    positive_int("max_tokens", args.max_tokens)
    if args.fidelity_positions < 0:
        raise UserError(f"fidelity_positions={args.fidelity_positions}: must be >= 0 (0 measures no fidelity)")
    fail_on_gate = parse_bool("fail_on_gate", args.fail_on_gate)
    registered = {
        name: check_registered_name(getattr(args, f"{name}_registered_model"), f"{name}_registered_model")
        for name in MODELS
    }
    policies = {
        "pipeline": GatePolicy(args.min_correct_rate, args.max_regression),
        "onnx": GatePolicy(args.min_correct_rate, args.max_regression, args.min_parity, args.parity_metric),
    }
    with scratch_dir("evaluate") as scratch_name:
        scratch = Path(scratch_name)
        rows = load_eval_set(eval_set_file(args.eval_set, scratch), args.max_rows)
        values = StepRunner(args.env_manager).fill_inputs("evaluate", STEPS["evaluate"].values(vars(args)))
        uris = {name: values[f"{name}_model_uri"] for name in MODELS}
        dataset = eval_dataset(rows, args.eval_set)
        fingerprint = f"{dataset.digest}:rows={len(rows)}:max_tokens={args.max_tokens}"
        with step_run("evaluate", values, logged_model_name(uris["onnx"])):
            mlflow.log_input(dataset, context="evaluation")
            mlflow.log_params({"eval_rows": len(rows), "eval_fingerprint": fingerprint})
            mlflow.log_params({f"{name}_model_uri_used": uri for name, uri in uris.items()})
            evaluated = measure_models(uris, rows, args.max_tokens, args.engine, scratch, args.fidelity_positions)
            log_results(rows, evaluated)

            def champion_quality_now(champion_uri: str) -> dict[str, float]:
                return summarize(measure_in_subprocess(champion_uri, rows, args.max_tokens, scratch).results)

            outcomes = gate_models(
                registered, uris, evaluated.quality, evaluated.parity, policies, fingerprint, champion_quality_now
            )
            for name, outcome in outcomes.items():
                print(f"promotion gate {name}: {outcome.describe()}")  # noqa: T201 - the step's report to the user
            gate_text = {name: outcome.decision.describe() for name, outcome in outcomes.items()}
            mlflow.log_text(comparison_markdown(evaluated.metrics, uris, gate_text, len(rows)), "comparison.md")
            check_gates(outcomes, fail_on_gate)


if __name__ == "__main__":
    run_cli(main, STEPS["evaluate"].build_parser(__doc__))
