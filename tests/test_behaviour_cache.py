"""The batch behaviour measured at load, kept on disk per model, runtime, CPU and thread count:
on the real tiny Phi-3 int4 model, and through the logged wrapper's load."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from slmkit.manifest import MANIFEST_NAME
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT
from slmkit.onnx.batching import batch_behaviour, batch_logits, behaviour_sizes
from slmkit.onnx.behaviour_cache import BEHAVIOUR_CACHE_ENV, behaviour_key, cache_folder, kept_batch_behaviour
from slmkit.onnx.greedy import load
from slmkit.onnx.session import model_tokens

SIZES = behaviour_sizes(4)


@pytest.fixture(scope="module")
def onnx_folder(wrapper_dir: Path) -> Path:
    return wrapper_dir / "artifacts" / ONNX_ARTIFACT


@pytest.fixture(scope="module")
def model(onnx_folder: Path):
    return load(onnx_folder, threads=1)[0]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "kept"
    monkeypatch.setenv(BEHAVIOUR_CACHE_ENV, str(folder))
    return folder


def test_a_measured_behaviour_is_kept_and_a_later_load_runs_no_batch(cache: Path, onnx_folder: Path, model):
    tokens = model_tokens(onnx_folder)
    measured = batch_behaviour(batch_logits(model, tokens, SIZES))
    manifest = onnx_folder / MANIFEST_NAME
    assert kept_batch_behaviour(manifest, model, tokens, SIZES, threads=1) == measured
    [kept] = cache.iterdir()
    assert json.loads(kept.read_text()) == {
        "behaviour": measured,
        "key": behaviour_key(manifest.read_bytes(), SIZES, 1),
    }
    # No model to run: the answer can only come from the kept file.
    assert kept_batch_behaviour(manifest, None, tokens, SIZES, threads=1) == measured


def test_other_files_or_threads_are_measured_afresh(cache: Path, onnx_folder: Path, model, tmp_path: Path):
    tokens = model_tokens(onnx_folder)
    manifest = onnx_folder / MANIFEST_NAME
    kept_batch_behaviour(manifest, model, tokens, SIZES, threads=1)
    with pytest.raises(TypeError):  # measured, and there is no model to measure on
        kept_batch_behaviour(manifest, None, tokens, SIZES, threads=2)
    entries = json.loads(manifest.read_text())
    entries["files"][0]["sha256"] = "0" * 64
    other = tmp_path / MANIFEST_NAME
    other.write_text(json.dumps(entries))
    with pytest.raises(TypeError):
        kept_batch_behaviour(other, None, tokens, SIZES, threads=1)


def test_a_damaged_kept_answer_is_measured_again_and_an_unwritable_folder_only_measures(
    cache: Path, onnx_folder: Path, model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    tokens = model_tokens(onnx_folder)
    manifest = onnx_folder / MANIFEST_NAME
    measured = kept_batch_behaviour(manifest, model, tokens, SIZES, threads=1)
    [kept] = cache.iterdir()
    kept.write_text('{"behaviour": "indep')  # as a crash mid-write would leave it, were it not atomic
    assert kept_batch_behaviour(manifest, model, tokens, SIZES, threads=1) == measured
    assert json.loads(kept.read_text())["behaviour"] == measured
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(BEHAVIOUR_CACHE_ENV, str(blocked))
    assert kept_batch_behaviour(manifest, model, tokens, SIZES, threads=1) == measured
    monkeypatch.setenv(BEHAVIOUR_CACHE_ENV, "off")
    assert cache_folder() is None
    assert kept_batch_behaviour(manifest, model, tokens, SIZES, threads=1) == measured


def test_the_wrapper_keeps_its_behaviour_only_for_a_folder_checked_against_its_manifest(
    cache: Path, wrapper_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("SLMKIT_VERIFY_ONNX", "false")
    mlflow.pyfunc.load_model(str(wrapper_dir), model_config={"tracing": "false"})
    assert not cache.exists()
    monkeypatch.delenv("SLMKIT_VERIFY_ONNX")
    first = mlflow.pyfunc.load_model(str(wrapper_dir), model_config={"tracing": "false"})
    [kept] = cache.iterdir()
    again = mlflow.pyfunc.load_model(str(wrapper_dir), model_config={"tracing": "false"})
    assert list(cache.iterdir()) == [kept]
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6}
    answers = [model.predict(question)[0]["choices"][0]["message"]["content"] for model in (first, again)]
    assert answers[0] == answers[1]
