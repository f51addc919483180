"""The hub code path of `download`, for real, against a hub-compatible server on 127.0.0.1.

Each test runs the download step with HF_ENDPOINT at tests/fake_hub.py's server and its own
Hugging Face cache, so faults (a dropped connection, bytes that do not match the hub's sha256, no
hub at all) reach huggingface_hub and our checks exactly as on the internet. The step runs as a
process of its own, as `main` and the bundle's tasks start it, and records its own run; one test
goes through `mlflow run` (its CLI costs ~3.5 s of CPU a launch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from harness.servers import free_port
from slmkit.workflow.steps import REVISION_TAG
from tests.conftest import TrackingServer, mlflow_run, run_step_module, runs_of
from tests.fake_hub import FakeHub, serve

REPO_ID = "slmkit-tests/tiny-phi3"
pytestmark = pytest.mark.integration


@pytest.fixture
def hub(tiny_phi3: Path) -> Iterator[FakeHub]:
    with serve(FakeHub(REPO_ID, tiny_phi3, refs=("main", "v1"))) as served:
        yield served


def download(server: TrackingServer, hub: FakeHub, cache: Path, experiment: str, *params: str, **env: str):
    """The download step of the fake hub's repo into `experiment`, with the Hugging Face cache at
    `cache`."""
    return run_step_module(
        server, experiment, "download", f"model={REPO_ID}", *params,
        HF_ENDPOINT=hub.url, HF_HOME=str(cache), **{"HF_HUB_OFFLINE": "0", **env},
    )  # fmt: skip


def logged_manifest(run_id: str) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/manifest.json"))


def assert_logged_files_match_the_hub(run_id: str, hub: FakeHub) -> None:
    manifest = logged_manifest(run_id)
    expected = hub.sha256s()
    assert manifest["files"], manifest
    for entry in manifest["files"]:
        assert entry["sha256"] == expected[entry["path"]], entry["path"]


def test_a_pinned_revision_is_fetched_at_its_commit_through_a_dropped_connection_then_offline_from_the_cache(
    tracking_server: TrackingServer, hub: FakeHub, tmp_path: Path
):
    weights, cache = "model.safetensors", tmp_path / "hf"
    hub.drop_after_bytes[weights] = len(hub.files[weights]) // 2
    result = download(tracking_server, hub, cache, "hub-pinned", "revision=v1")
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs_of("hub-pinned")[-1]
    assert run.data.tags[REVISION_TAG] == hub.commit
    assert run.data.params["resolved_revision"] == hub.commit
    assert_logged_files_match_the_hub(run.info.run_id, hub)
    # Files were fetched at the commit, not at the moving tag.
    assert any(request.startswith(f"GET /{REPO_ID}/resolve/{hub.commit}/") for request in hub.requests)
    # The connection dropped mid-file did fire, and the file was resumed once.
    assert weights not in hub.drop_after_bytes
    assert hub.requests.count(f"GET /{REPO_ID}/resolve/{hub.commit}/{weights}") == 2

    # The warm cache downloads offline with zero requests.
    hub.requests.clear()
    result = download(tracking_server, hub, cache, "hub-pinned", "revision=v1", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.requests == []
    offline = runs_of("hub-pinned")[-1]
    assert offline.info.run_id != run.info.run_id
    assert offline.data.tags[REVISION_TAG] == hub.commit
    assert_logged_files_match_the_hub(offline.info.run_id, hub)


def test_bytes_that_do_not_match_the_hubs_sha256_are_refused(
    tracking_server: TrackingServer, hub: FakeHub, tmp_path: Path
):
    weights = "model.safetensors"
    tampered = bytearray(hub.files[weights])
    tampered[len(tampered) // 2] ^= 0xFF
    hub.tampered[weights] = bytes(tampered)
    cache = tmp_path / "hf"
    result = download(tracking_server, hub, cache, "hub-tampered")
    assert result.returncode != 0
    assert f"{weights} has sha256" in result.stderr
    assert "not the hub's" in result.stderr
    assert "Traceback" not in result.stderr
    failed = runs_of("hub-tampered")[-1]
    assert failed.info.status == "FAILED"
    assert mlflow.artifacts.list_artifacts(run_id=failed.info.run_id) == []  # nothing logged that looks valid
    # The bad bytes left the cache: once the hub serves the right ones, the rerun succeeds.
    del hub.tampered[weights]
    rerun = download(tracking_server, hub, cache, "hub-tampered")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_logged_files_match_the_hub(runs_of("hub-tampered")[-1].info.run_id, hub)


def test_a_cold_cache_without_the_hub_fails_fast_and_the_run_is_failed(
    tracking_server: TrackingServer, hub: FakeHub, tmp_path: Path
):
    started = time.monotonic()
    result = download(tracking_server, hub, tmp_path / "hf", "hub-cold-offline", HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert time.monotonic() - started < 60  # the whole step, its process start included
    assert f"hub repo {REPO_ID}@main" in result.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in result.stderr
    assert "Traceback" not in result.stderr
    assert hub.requests == []
    failed = runs_of("hub-cold-offline")[-1]
    assert failed.info.status == "FAILED"
    assert (failed.info.end_time - failed.info.start_time) / 1000 < 10


def test_an_unreachable_hub_fails_fast_naming_offline_presets(tracking_server: TrackingServer, tmp_path: Path):
    started = time.monotonic()
    result = mlflow_run(
        tracking_server, "--experiment-name", "no-hub", "-e", "download", "-P", "model=microsoft/Phi-3-mini-4k-instruct",
        HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"),
    )  # fmt: skip
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert "cannot reach the Hugging Face Hub" in result.stderr
    assert "smollm2-135m" in result.stderr
    assert "Traceback" not in result.stderr
    failed = runs_of("no-hub")[-1]
    assert failed.info.status == "FAILED"
    assert (failed.info.end_time - failed.info.start_time) / 1000 < 10


def test_a_hub_repo_without_safetensors_is_refused_in_one_line(
    tracking_server: TrackingServer, tiny_phi3: Path, tmp_path: Path
):
    pickled_only = tmp_path / "pickled-only"
    pickled_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled_only / name).write_bytes((tiny_phi3 / name).read_bytes())
    (pickled_only / "pytorch_model.bin").write_bytes(b"a pickle that is never fetched")
    with serve(FakeHub(REPO_ID, pickled_only)) as pickled_hub:
        result = download(tracking_server, pickled_hub, tmp_path / "hf", "hub-pickled")
        fetched = [request for request in pickled_hub.requests if "/resolve/" in request]
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"hub repo {REPO_ID}@main has no .safetensors weights" in errors[0]
    assert "Traceback" not in result.stderr
    assert fetched == []  # refused from the file listing, before any byte of the pickle
    assert runs_of("hub-pickled")[-1].info.status == "FAILED"
