"""Measure one logged model in a process of its own, so its peak memory is its alone.

The `evaluate` step calls `measure_in_subprocess` once per model; the child process runs this
module, loads the model by URI, answers the eval rows with `evaluate_model`, and writes a JSON
result. Both models are measured by the same code, so their figures compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from slmkit.chat.adapters import load_pyfunc
from slmkit.errors import UserError
from slmkit.evaluation.fidelity import MIN_POSITIONS, measure_fidelity
from slmkit.evaluation.scoring import RowResult, evaluate_model
from slmkit.manifest import folder_bytes
from slmkit.models.onnx_wrapper import onnx_folder
from slmkit.onnx.batching import PROMPT_CACHE_ENV
from slmkit.sources.eval_set import EvalRow, load_eval_set, write_eval_set


@dataclass(frozen=True)
class Measurement:
    """One model's answers and timings, plus what it costs to hold."""

    results: list[RowResult]
    peak_rss_bytes: int
    model_size_bytes: int
    load_seconds: float
    # The ONNX model's fidelity to this one, measured beside it (slmkit.evaluation.fidelity).
    fidelity: dict[str, float] | None = None

    def size_metrics(self) -> dict[str, float]:
        return {
            "peak_rss_bytes": self.peak_rss_bytes,
            "model_size_bytes": self.model_size_bytes,
            "load_seconds": self.load_seconds,
        }


@dataclass(frozen=True)
class FidelityOf:
    """Which ONNX wrapper's fidelity the pipeline's measuring process measures, over how many positions."""

    onnx_model_uri: str
    positions: int = MIN_POSITIONS


def measure(
    model_uri: str, rows: list[EvalRow], max_tokens: int, download_dir: Path, fidelity_of: FidelityOf | None = None
) -> Measurement:
    """Download `model_uri` into `download_dir`, load and evaluate it in this process.

    With `fidelity_of`, `model_uri` is the transformers pipeline, and the ONNX model's fidelity to
    it is measured after the peak memory is read: teacher-forced along the pipeline's own answers
    and the shipped text, with the float model already loaded here.
    """
    import mlflow

    mlflow.tracing.disable()  # traces per request would cost time and clutter the experiment
    started = time.perf_counter()
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(download_dir)))
    # Without MLflow's check of the model's requirements: it reads every installed distribution's
    # file list (~1 s here, more than loading the tiny models), and its warning would go to this
    # child's stderr, which the evaluate step shows only when the child fails.
    model = load_pyfunc(str(local), suppress_warnings=True)
    load_seconds = time.perf_counter() - started
    results = evaluate_model(model.predict, rows, max_tokens)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    measured = Measurement(results, peak_kib * 1024, folder_bytes(local), load_seconds)
    if not fidelity_of:
        return measured
    pipeline = model.get_raw_model()
    conversations = [(row.messages, result.answer) for row, result in zip(rows, results, strict=True)]
    onnx_copy = mlflow.artifacts.download_artifacts(fidelity_of.onnx_model_uri, dst_path=str(download_dir / "onnx"))
    onnx_dir = onnx_folder(Path(onnx_copy))
    scored = measure_fidelity(pipeline.model, pipeline.tokenizer, onnx_dir, conversations, fidelity_of.positions)
    return replace(measured, fidelity=scored.metrics())


def measure_in_subprocess(
    model_uri: str, rows: list[EvalRow], max_tokens: int, scratch: Path, fidelity_of: FidelityOf | None = None
) -> Measurement:
    """Run `measure` in a child Python process and read its result back.

    Raises:
        UserError: the child failed, for example the model could not load; its output tail is kept.
    """
    rows_path, result_path = scratch / "rows.jsonl", scratch / "measurement.json"
    write_eval_set(rows, rows_path)
    # The parent owns the download's folder: removed once the child exits, however it exited,
    # so only one model at a time takes disk (Phi-3's pipeline is 7.6 GB).
    with tempfile.TemporaryDirectory(prefix="model-", dir=scratch) as download_dir:
        command = [sys.executable, "-m", "slmkit.evaluation.measure", model_uri, str(rows_path), str(max_tokens), str(result_path),
                   download_dir]  # fmt: skip
        if fidelity_of is not None:
            command += [fidelity_of.onnx_model_uri, str(fidelity_of.positions)]
        # Without the wrapper's prompt cache: time to first token is measured as its own one-token
        # request, and the full request would then find its whole prompt cached and look faster.
        environment = {**os.environ, PROMPT_CACHE_ENV: "0"}
        completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-12:])
        raise UserError(f"evaluating {model_uri} failed:\n{tail}")
    raw = json.loads(result_path.read_text())
    results = [RowResult(**row) for row in raw.pop("results")]
    return Measurement(results=results, **raw)


def _main() -> None:
    parser = argparse.ArgumentParser(description="Measure one model; internal to the evaluate step.")
    parser.add_argument("model_uri")
    parser.add_argument("rows", type=Path)
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("output", type=Path)
    parser.add_argument("download_dir", type=Path)
    parser.add_argument("fidelity_of", nargs="?", default="", help="an ONNX wrapper's URI")
    parser.add_argument("fidelity_positions", nargs="?", type=int, default=MIN_POSITIONS)
    args = parser.parse_args()
    fidelity_of = FidelityOf(args.fidelity_of, args.fidelity_positions) if args.fidelity_of else None
    measurement = measure(args.model_uri, load_eval_set(args.rows), args.max_tokens, args.download_dir, fidelity_of)
    args.output.write_text(json.dumps(asdict(measurement)))


if __name__ == "__main__":
    _main()
