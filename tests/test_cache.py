"""The step cache key: what changes it, what does not, and the per-key lock."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError
from slmkit.workflow.cache import cache_key, code_files, forced_steps, normalize_params, step_lock

PARAMS = {
    "download_run_id": "abc",
    "model": "smollm2-135m",
    "temperature": "0.0",
    "max_new_tokens": "256",
    "torch_dtype": "auto",
}
UPSTREAM = {"download_run_id": "abc"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's code and config, to change files in."""
    root = tmp_path / "project"
    for name in ("MLproject", "conda.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, root / name)
    for folder in ("config", "steps", "wrappers", "slmkit"):
        shutil.copytree(PROJECT_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_same_inputs_give_the_same_key_and_numbers_are_normalised(project: Path):
    key = cache_key("log_pipeline", PARAMS, UPSTREAM, project)
    assert key == cache_key("log_pipeline", {**PARAMS, "temperature": "0", "max_new_tokens": "256"}, UPSTREAM, project)
    assert key == cache_key("log_pipeline", {**PARAMS, "env_manager": "uv"}, UPSTREAM, project)
    assert key == cache_key("log_pipeline", {**PARAMS, "temperature": "0.00", "unknown": "x"}, UPSTREAM, project)


def test_a_param_change_changes_the_key(project: Path):
    key = cache_key("log_pipeline", PARAMS, UPSTREAM, project)
    assert key != cache_key("log_pipeline", {**PARAMS, "download_run_id": "def"}, UPSTREAM, project)
    assert key != cache_key("log_pipeline", {**PARAMS, "torch_dtype": "bfloat16"}, UPSTREAM, project)
    assert key != cache_key("log_pipeline", {**PARAMS, "temperature": "0.7"}, UPSTREAM, project)


def test_an_upstream_change_changes_the_key(project: Path):
    key = cache_key("log_pipeline", PARAMS, UPSTREAM, project)
    assert key != cache_key("log_pipeline", PARAMS, {"download_run_id": "def"}, project)
    download = cache_key("download", {"model": "x", "revision": ""}, {"source_revision": "commit-1"}, project)
    assert download != cache_key("download", {"model": "x", "revision": ""}, {"source_revision": "commit-2"}, project)


def test_editing_a_step_file_changes_that_step_only(project: Path):
    before = {step: cache_key(step, {}, {}, project) for step in ("download", "log_onnx_wrapper")}
    wrapper = project / "wrappers" / "onnx_chat_model.py"
    wrapper.write_text(wrapper.read_text() + "\n# a change\n")
    assert cache_key("log_onnx_wrapper", {}, {}, project) != before["log_onnx_wrapper"]
    assert cache_key("download", {}, {}, project) == before["download"]


def test_editing_the_library_or_presets_changes_every_step(project: Path):
    before = cache_key("download", {}, {}, project)
    presets = project / "config" / "presets.yaml"
    presets.write_text(presets.read_text() + "\n# a comment\n")
    assert cache_key("download", {}, {}, project) != before


def test_touching_an_identical_file_keeps_the_key(project: Path):
    before = cache_key("log_onnx_wrapper", {}, {}, project)
    time.sleep(0.01)
    for path in code_files("log_onnx_wrapper", project):
        path.touch()
    assert cache_key("log_onnx_wrapper", {}, {}, project) == before


def test_bad_numbers_are_refused_by_name():
    with pytest.raises(UserError, match="temperature='abc': not a valid float"):
        normalize_params("log_pipeline", {"temperature": "abc"})


def test_force_values():
    assert forced_steps("false") == frozenset()
    assert forced_steps("true") == {"download", "log_pipeline", "log_onnx_wrapper", "evaluate"}
    assert forced_steps("log_onnx_wrapper") == {"log_onnx_wrapper", "evaluate"}
    with pytest.raises(UserError, match="force='yes'"):
        forced_steps("yes")


def test_step_lock_makes_a_second_holder_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMKIT_LOCK_DIR", str(tmp_path))
    events: list[str] = []

    def hold(name: str, seconds: float) -> None:
        with step_lock("key"):
            events.append(f"{name} in")
            time.sleep(seconds)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("first", 0.5))
    first.start()
    time.sleep(0.1)
    hold("second", 0)
    first.join()
    assert events == ["first in", "first out", "second in", "second out"]
