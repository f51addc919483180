"""The short report `main` prints at the end: what ran, what was logged, how the models compare."""

from __future__ import annotations

from slmkit.report import comparison_table


def format_summary(
    parent_run_id: str,
    step_runs: dict[str, str],
    model_uris: dict[str, str],
    eval_metrics: dict[str, float],
    gate: dict[str, str],
    tracking_uri: str,
) -> str:
    """A plain-text summary: run ids, model URIs, the comparison table, the gate, next commands."""
    lines = [f"pipeline run {parent_run_id}"]
    lines += [f"  {step:<17} run {run_id}" for step, run_id in step_runs.items()]
    lines.append("models")
    lines += [f"  {name:<17} {uri}" for name, uri in model_uris.items()]
    lines += ["", comparison_table(eval_metrics), ""]
    if gate:
        lines.append("promotion gate")
        lines += [f"  {name:<17} {decision}" for name, decision in gate.items()]
    first_uri = next(iter(model_uris.values()), "models:/<id>")
    lines.append("next")
    lines.append(
        f"  serve: MLFLOW_TRACKING_URI={tracking_uri} python -m slmkit.serve -m {first_uri} -p 5001  (OpenAI route: /v1)"
    )
    lines.append(f"  UI:    mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)
