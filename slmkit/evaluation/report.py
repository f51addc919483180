"""What a person looks at: the comparison table (markdown), the plots, and `main`'s closing summary.

The same table goes into the evaluate run as `comparison.md` and into `main`'s summary.
"""

from __future__ import annotations

import math
import shlex
import sys
from typing import Any

from slmkit import PROJECT_ROOT

# (metric key, label, format) in the order a reader compares them.
TABLE_METRICS = (
    ("answer_correct_rate", "answer correct rate", "{:.3f}"),
    ("token_f1_mean", "token F1", "{:.3f}"),
    ("well_formed_rate", "well-formed rate", "{:.3f}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("latency_p95_s", "latency p95 (s)", "{:.3f}"),
    ("ttft_median_s", "time to first token (s)", "{:.3f}"),
    ("decode_tokens_per_s_median", "decode tokens/s", "{:.1f}"),
    ("prompt_tokens_per_s_median", "prompt tokens/s", "{:.1f}"),
    ("peak_rss_bytes", "peak memory (MiB)", "mib"),
    ("model_size_bytes", "size on disk (MiB)", "mib"),
)


def _format(value: float | None, style: str) -> str:
    if value is None or math.isnan(value):  # not logged, or too fast to time (evaluation.summarize)
        return "-"
    if style == "mib":
        return f"{value / 2**20:.0f}"
    return style.format(value)


def comparison_table(metrics: dict[str, float], models: tuple[str, ...] = ("pipeline", "onnx")) -> str:
    """A markdown table of the key metrics, one column per model, then the parity figures."""
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key, label, style in TABLE_METRICS:
        lines.append(f"| {label} | " + " | ".join(_format(metrics.get(f"{m}/{key}"), style) for m in models) + " |")
    for key in sorted(k for k in metrics if k.startswith("parity/")):
        # Four significant digits: a KL divergence of 0.0028 is not 0.003, and a count stays whole.
        lines.append(f"| {key} | {metrics[key]:.4g} |" + " |" * (len(models) - 1))
    return "\n".join(lines)


def comparison_markdown(
    metrics: dict[str, float], model_uris: dict[str, str], gate: dict[str, str], eval_rows: int
) -> str:
    """The one-page comparison logged as `comparison.md`."""
    parts = [f"# Pipeline vs ONNX int4 on {eval_rows} eval rows", "", comparison_table(metrics), "", "## Models", ""]
    parts += [f"- {name}: `{uri}`" for name, uri in model_uris.items()]
    if gate:
        parts += ["", "## Promotion gate", ""]
        parts += [f"- {name}: {decision}" for name, decision in gate.items()]
    return "\n".join(parts) + "\n"


def latency_figure(latencies: dict[str, list[float]]) -> Any:
    """Box plot and points of per-row latency, one box per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    names = list(latencies)
    axes.boxplot([latencies[n] for n in names], tick_labels=names)
    for index, name in enumerate(names, start=1):
        axes.scatter([index] * len(latencies[name]), latencies[name], alpha=0.5, s=12)
    axes.set_ylabel("latency per answer (s)")
    axes.set_title("Latency distribution")
    figure.tight_layout()
    return figure


def overview_figure(metrics: dict[str, float], models: tuple[str, ...] = ("pipeline", "onnx")) -> Any:
    """Throughput and quality side by side, one bar per model in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = (
        ("decode_tokens_per_s_median", "decode tokens/s"),
        ("answer_correct_rate", "answer correct rate"),
        ("token_f1_mean", "token F1"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(10, 3.5))
    for axis, (key, label) in zip(axes, panels, strict=True):
        axis.bar(models, [metrics.get(f"{m}/{key}", 0.0) for m in models], color=["#4c72b0", "#dd8452"])
        axis.set_title(label)
    figure.tight_layout()
    return figure


def quality_speed_figure(candidates: list[Any], min_top1_agreement: float) -> Any:
    """Top-1 agreement with the float model against decode tokens/s of each built quantization
    candidate, with the bar a build must reach as a line (quantization=auto)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for candidate in (c for c in candidates if not c.skipped):
        axis.scatter(candidate.decode_tokens_per_s, candidate.top1_agreement, s=40)
        label = f"{candidate.quantization} ({candidate.size_bytes / 2**20:.0f} MiB)"
        axis.annotate(
            label, (candidate.decode_tokens_per_s, candidate.top1_agreement), textcoords="offset points", xytext=(5, 5)
        )
    axis.axhline(min_top1_agreement, linestyle="--", color="grey", label="min_top1_agreement")
    axis.set_xlabel("decode tokens/s")
    axis.set_ylabel("top-1 agreement with the float model")
    axis.set_title("Quantization candidates")
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def serve_command(tracking_uri: str, model_uri: str, port: int = 5001) -> str:
    """The shell command that serves `model_uri` as printed, from any folder: it changes to the
    project, names the store, and runs the interpreter this step runs on, which has the project's
    environment (outside the venv, a bare `python` would not)."""
    python, project = shlex.quote(sys.executable), shlex.quote(str(PROJECT_ROOT))
    uri = shlex.quote(tracking_uri)
    return f"cd {project} && MLFLOW_TRACKING_URI={uri} {python} -m slmkit.serve -m {shlex.quote(model_uri)} -p {port}"


def format_summary(
    parent_run_id: str,
    step_runs: dict[str, str],
    model_uris: dict[str, str],
    eval_metrics: dict[str, float],
    gate: dict[str, str],
    tracking_uri: str,
    served_model_uri: str,
) -> str:
    """A plain-text summary: run ids, model URIs, the comparison table, the gate, next commands
    (`served_model_uri` in the serve command: the registered champion, where there is one)."""
    lines = [f"pipeline run {parent_run_id}"]
    lines += [f"  {step:<17} run {run_id}" for step, run_id in step_runs.items()]
    lines.append("models")
    lines += [f"  {name:<17} {uri}" for name, uri in model_uris.items()]
    lines += ["", comparison_table(eval_metrics), ""]
    if gate:
        lines.append("promotion gate")
        lines += [f"  {name:<17} {decision}" for name, decision in gate.items()]
    lines.append("next")
    lines.append(f"  serve: {serve_command(tracking_uri, served_model_uri)}  (OpenAI route: /v1)")
    lines.append(f"  UI:    mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)
