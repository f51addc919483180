"""The short report `main` prints at the end: what ran, what was logged, how the models compare."""

from __future__ import annotations

# The metrics a person compares first, in the order shown.
KEY_METRICS = (
    "answer_correct_rate",
    "token_f1_mean",
    "latency_p50_s",
    "ttft_median_s",
    "decode_tokens_per_s_median",
)


def format_summary(
    parent_run_id: str,
    step_runs: dict[str, str],
    model_uris: dict[str, str],
    eval_metrics: dict[str, float],
    tracking_uri: str,
) -> str:
    """A plain-text summary: run ids, model URIs, key metrics side by side, next commands."""
    lines = [f"pipeline run {parent_run_id}"]
    lines += [f"  {step:<17} run {run_id}" for step, run_id in step_runs.items()]
    lines.append("models")
    lines += [f"  {name:<17} {uri}" for name, uri in model_uris.items()]
    names = list(model_uris)
    lines.append(f"  {'metric':<28}" + "".join(f"{name:>14}" for name in names))
    for metric in KEY_METRICS:
        values = [eval_metrics.get(f"{name}/{metric}") for name in names]
        lines.append(f"  {metric:<28}" + "".join(f"{'-' if v is None else f'{v:.3f}':>14}" for v in values))
    for key in sorted(k for k in eval_metrics if k.startswith("parity/")):
        lines.append(f"  {key:<28}{eval_metrics[key]:>14.3f}")
    lines.append("next")
    first_uri = next(iter(model_uris.values()), "models:/<id>")
    lines.append(
        f"  serve: MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {first_uri} --env-manager local -p 5001"
    )
    lines.append(f"  UI:    mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)
