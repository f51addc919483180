"""Both models measured alike: in a process of their own, or with their answers from Spark.

`measure_models` is the `evaluate` step's measuring: each model's rows answered, timed, scored
(`slmkit.evaluation.scoring`) and recorded as MLflow traces (`slmkit.evaluation.scorers`), and
the ONNX model's parity with the pipeline's answers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from slmkit.batch.spark import answer_eval_rows, spark_session
from slmkit.evaluation.measure import FidelityOf, Measurement, measure_in_subprocess
from slmkit.evaluation.scorers import record_scores
from slmkit.evaluation.scoring import answer_agreement, parity, scored, summarize, with_timings
from slmkit.sources.eval_set import EvalRow

# engine=spark: rows timed in process (latency, speed, memory); answers for all rows come from Spark.
TIMING_ROWS = 32
SPARK_PARTITIONS = 2


def measure_on_spark(
    spark, uri: str, rows: list[EvalRow], max_tokens: int, scratch: Path, fidelity_of: FidelityOf | None = None
) -> tuple[Measurement, float]:
    """engine=spark: every row's answer from the batch path, timings (and fidelity) on the first
    TIMING_ROWS rows in process; and how often the two paths gave the same answer on those rows."""
    scratch.mkdir(parents=True, exist_ok=True)
    timed = measure_in_subprocess(uri, rows[:TIMING_ROWS], max_tokens, scratch, fidelity_of)
    responses = answer_eval_rows(spark, uri, rows, max_tokens, scratch, SPARK_PARTITIONS)
    answered = [scored(row, response) for row, response in zip(rows, responses, strict=True)]
    agreement = answer_agreement(timed.results, answered)
    return replace(timed, results=with_timings(answered, timed.results)), agreement


@dataclass(frozen=True)
class Evaluated:
    """Both models measured alike: their measurements, quality summaries and the ONNX model's parity."""

    measurements: dict[str, Measurement]
    quality: dict[str, dict[str, float]]
    parity: dict[str, float]
    engine_agreement: dict[str, float]

    @property
    def metrics(self) -> dict[str, float]:
        """The run's metrics: `<model>/*` (quality, timings, size, engine agreement) and `parity/*`."""
        metrics = {}
        for name, measurement in self.measurements.items():
            model_metrics = {**self.quality[name], **measurement.size_metrics()}
            if name in self.engine_agreement:
                model_metrics["engine_agreement_rate"] = self.engine_agreement[name]
            metrics.update({f"{name}/{key}": value for key, value in model_metrics.items()})
        return {**metrics, **{f"parity/{key}": value for key, value in self.parity.items()}}


def measure_models(
    uris: dict[str, str], rows: list[EvalRow], max_tokens: int, engine: str, scratch: Path, fidelity_positions: int
) -> Evaluated:
    """Each model measured alike, locally or with its answers from Spark, its rows scored by MLflow's
    scorers; the pipeline's process also measures the ONNX model's fidelity to it (`parity/top1_agreement`,
    `parity/kl_divergence`, beside the answers' exact-match parity) over `fidelity_positions`
    positions at least; 0 measures none."""
    spark = spark_session(SPARK_PARTITIONS) if engine == "spark" else None
    measurements, agreement = {}, {}
    for name, uri in uris.items():
        wanted = name == "pipeline" and fidelity_positions > 0
        fidelity_of = FidelityOf(uris["onnx"], fidelity_positions) if wanted else None
        if spark:
            measurements[name], agreement[name] = measure_on_spark(
                spark, uri, rows, max_tokens, scratch / name, fidelity_of
            )
        else:
            measurements[name] = measure_in_subprocess(uri, rows, max_tokens, scratch, fidelity_of)
        record_scores(name, rows, measurements[name].results)
    quality = {name: summarize(measurement.results) for name, measurement in measurements.items()}
    answers = parity(measurements["pipeline"].results, measurements["onnx"].results)
    return Evaluated(measurements, quality, {**answers, **(measurements["pipeline"].fidelity or {})}, agreement)
