"""`log_onnx_wrapper`, run as its entry point's command: a GGUF source carried over (the GGUF
travels through the tracking server with the download run), and `quantization=auto` choosing by
measured quality."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from slmkit.manifest import file_sha256, read_manifest
from slmkit.workflow.steps import DOWNLOAD_RUN_TAG, MODEL_URI_TAG, STEP_TAG
from tests.conftest import TRAINED_ROWS, TrackingServer, run_step_module, runs_of
from tests.tiny_models import build_tiny_phi3, write_tiny_gguf

pytestmark = pytest.mark.integration
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Phi-3 as a Q4_1 GGUF file (4k context, as Phi-3-mini-4k)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    return write_tiny_gguf(build_tiny_phi3(root / "phi3", context_length=4096), root / "tiny-phi3.gguf", "Q4_1")


def newest(experiment: str, step: str) -> mlflow.entities.Run:
    return [r for r in runs_of(experiment) if r.data.tags.get(STEP_TAG) == step][-1]


@pytest.mark.slow(seconds=25)
def test_a_gguf_source_is_carried_over_by_default_and_logged_with_its_tensor_report(
    tracking_server: TrackingServer, tiny_gguf: Path, tmp_path: Path
):
    result = run_step_module(tracking_server, "gguf", "log_onnx_wrapper", f"model={tiny_gguf}")
    assert result.returncode == 0, result.stderr[-3000:]
    onnx_run, download = newest("gguf", "log_onnx_wrapper"), newest("gguf", "download")
    assert onnx_run.data.tags[DOWNLOAD_RUN_TAG] == download.info.run_id
    assert onnx_run.data.params["onnx_quantization"] == "gguf"
    assert onnx_run.data.params["gguf_tensors"] == "carried=9,requantized=0"
    report = mlflow.artifacts.load_text(f"runs:/{onnx_run.info.run_id}/gguf_tensors.tsv").splitlines()
    assert len(report) == 9  # per layer: q/k/v, o, gate and up (one node), down; and the LM head
    assert all(line.startswith("carried\t") and line.endswith("\tQ4_1") for line in report)
    # The source file itself went through the tracking server with the download run, checksummed.
    manifest = read_manifest(
        Path(mlflow.artifacts.download_artifacts(f"runs:/{download.info.run_id}/manifest.json", dst_path=str(tmp_path)))
    )
    assert [entry["path"] for entry in manifest["gguf"]] == ["tiny-phi3.gguf"]
    assert manifest["gguf"][0]["sha256"] == file_sha256(tiny_gguf)
    model = mlflow.pyfunc.load_model(onnx_run.data.tags[MODEL_URI_TAG], model_config={"tracing": "false"})
    answer = model.predict(CHAT)[0]
    assert answer["usage"]["completion_tokens"] == 6
    assert answer["model"] == "tiny-phi3"


@pytest.mark.slow(seconds=25)
def test_auto_keeps_the_smallest_build_that_keeps_the_float_models_top_tokens_and_logs_every_candidate(
    tracking_server: TrackingServer, trained_tiny_phi3: Path
):
    # In an experiment of its own, off pipeline_run's worker: the step runs its download itself.
    result = run_step_module(
        tracking_server, "auto-quantization", "log_onnx_wrapper",
        f"model={trained_tiny_phi3}", "quantization=auto", f"calibration_rows={TRAINED_ROWS}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert newest("auto-quantization", "download").info.status == "FINISHED"
    run = newest("auto-quantization", "log_onnx_wrapper")
    assert run.data.params["quantization"] == "auto"
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/quantization_candidates.json"))
    rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    reference = run.data.metrics["calibration/reference_correct_rate"]
    assert reference == 1.0  # the trained rows are answered by the source itself
    assert run.data.metrics["calibration/fidelity_positions"] >= 2000
    # Tried smallest first, stopping at the first that keeps min_top1_agreement (0.9) of the
    # float model's top-1 tokens.
    assert [r["quantization"] for r in rows] == ["int4", "int4-kquant", "int8", "fp32"][: len(rows)]
    kept = [r for r in rows if not r["skipped"] and r["top1_agreement"] >= 0.9]
    assert kept, rows
    assert kept[0] is rows[-1]
    assert run.data.params["onnx_quantization"] == kept[0]["quantization"]
    assert all(0 <= r["kl_divergence"] < 1 for r in kept)
    assert all(r["size_bytes"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows if not r["skipped"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/quantization_quality_speed.png"}
