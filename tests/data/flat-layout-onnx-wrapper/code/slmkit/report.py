"""What a person looks at: the comparison table (markdown) and two plots.

The same table goes into the evaluate run as `comparison.md` and into `main`'s summary.
"""

from __future__ import annotations

import math
from typing import Any

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
        lines.append(f"| {key} | {metrics[key]:.3f} |" + " |" * (len(models) - 1))
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


def quality_speed_figure(candidates: list[Any], reference_correct_rate: float) -> Any:
    """Answer-correct rate against decode tokens/s of each built quantization candidate, with
    the source's own correct rate as a line (quantization=auto)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for candidate in (c for c in candidates if not c.skipped):
        axis.scatter(candidate.decode_tokens_per_s, candidate.correct_rate, s=40)
        label = f"{candidate.quantization} ({candidate.size_bytes / 2**20:.0f} MiB)"
        axis.annotate(
            label, (candidate.decode_tokens_per_s, candidate.correct_rate), textcoords="offset points", xytext=(5, 5)
        )
    axis.axhline(reference_correct_rate, linestyle="--", color="grey", label="source (transformers)")
    axis.set_xlabel("decode tokens/s")
    axis.set_ylabel("answer correct rate")
    axis.set_title("Quantization candidates")
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure
