"""Faults the ONNX wrapper and the pipeline must survive: corrupted artifacts, leaked secrets."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import HF_TOKEN_CANARY, PipelineRun, TrackingServer

ONNX_FOLDER = Path("artifacts") / "onnx_model"


@pytest.fixture
def wrapper_copy(wrapper_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(wrapper_dir, tmp_path / "model"))


def test_flipped_weight_bytes_fail_the_load_naming_the_file(wrapper_copy: Path):
    weights = wrapper_copy / ONNX_FOLDER / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"model\.onnx\.data: sha256 mismatch"):
        mlflow.pyfunc.load_model(str(wrapper_copy))


def test_deleted_tokenizer_fails_the_load_naming_the_file(wrapper_copy: Path):
    (wrapper_copy / ONNX_FOLDER / "tokenizer.json").unlink()
    with pytest.raises(Exception, match=r"tokenizer\.json: missing"):
        mlflow.pyfunc.load_model(str(wrapper_copy))


def test_verification_can_be_turned_off_and_costs_little(wrapper_copy: Path, monkeypatch: pytest.MonkeyPatch):
    started = time.perf_counter()
    mlflow.pyfunc.load_model(str(wrapper_copy))
    verified = time.perf_counter() - started
    monkeypatch.setenv("SLMKIT_VERIFY_ONNX", "false")
    (wrapper_copy / ONNX_FOLDER / "manifest.json").write_text('{"files": []}')  # would fail if checked
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(str(wrapper_copy))
    unverified = time.perf_counter() - started
    assert (
        model.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})[0]["object"]
        == "chat.completion"
    )
    assert verified < unverified + 2.0  # generous: the tiny model's files hash in milliseconds


@pytest.mark.integration
def test_hf_token_never_reaches_the_store_artifacts_or_output(
    pipeline_run: PipelineRun, tracking_server: TrackingServer
):
    assert HF_TOKEN_CANARY not in pipeline_run.output
    hits = [
        path
        for path in tracking_server.root.rglob("*")
        if path.is_file() and HF_TOKEN_CANARY.encode() in path.read_bytes()
    ]
    assert hits == []
    assert pipeline_run.children["download"].data.params  # the run did log params, just not the token
