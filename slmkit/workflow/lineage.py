"""How steps find each other through the tracking server, never through local folders.

Each step tags its run with the step name and the lineage of the model it worked on (source key,
resolved revision, download run). Which upstream run a step builds on is decided by its cache
key alone (slmkit.workflow.cache); this module launches entry points and reads runs and artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID
from mlflow.exceptions import ExecutionException, MlflowException
from mlflow.projects.submitted_run import SubmittedRun

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError, check_choice
from slmkit.manifest import MANIFEST_NAME, read_manifest, verify_folder
from slmkit.sources.presets import ModelSpec
from slmkit.workflow.steps import (
    DOWNLOAD_RUN_TAG,
    ENV_MANAGERS,
    MANIFEST_SHA_TAG,
    REVISION_TAG,
    SOURCE_KEY_TAG,
    STEP_TAG,
)
from slmkit.workflow.tracking_server import require_tracking_server

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
GGUF_ARTIFACT = "gguf"


def source_key(spec: ModelSpec) -> str:
    """A short stable id of the requested source, so runs of the same model find each other."""
    payload = json.dumps(asdict(spec.source), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def current_experiment_id() -> str | None:
    """The experiment `mlflow run` put this step in; None lets MLflow choose its default."""
    return MLFLOW_EXPERIMENT_ID.get()


def check_env_manager(env_manager: str) -> str:
    return check_choice("env_manager", env_manager, ENV_MANAGERS)


def run_entry_point(
    step: str,
    parameters: dict[str, str],
    env_manager: str,
    experiment_id: str | None = None,
) -> str:
    """Run an entry point of this project with `mlflow run` semantics and return its run id.

    When a run is active, MLflow makes the new run its child. The env manager is passed on
    explicitly: `mlflow.projects.run` does not inherit the caller's. Synchronous, so MLflow runs
    the step's command itself and waits for it: asynchronous, it starts a whole `mlflow run`
    process around the command, about 3 s of CPU for each step.

    Raises:
        UserError: the step failed; the message names its run id.
        TrackingServerUnreachable: the tracking server does not answer, so the step cannot start.
    """
    logger.info("running step %s with %s", step, parameters)
    require_tracking_server()
    try:
        submitted: SubmittedRun = mlflow.projects.run(
            str(PROJECT_ROOT),
            entry_point=step,
            parameters=parameters,
            env_manager=check_env_manager(env_manager),
            experiment_id=experiment_id or current_experiment_id(),
            synchronous=True,
        )
    except ExecutionException as error:
        # `mlflow.projects.run` raises this one error for a step that could not start and for
        # one that ran and failed; only the second names a run, which it has marked FAILED.
        failed = re.fullmatch(r"Run \(ID '(\w+)'\) failed", error.message)
        if failed is None:
            raise UserError(f"could not start step {step}: {error.message}") from error
        require_tracking_server()  # a step that lost its server fails for that reason
        raise UserError(f"step {step} failed: see run {failed.group(1)} and its output above") from error
    except MlflowException as error:
        raise UserError(f"could not start step {step}: {error.message}") from error
    return submitted.run_id


@dataclass(frozen=True)
class DownloadRun:
    """A FINISHED `download` run, as the steps after it need to know it."""

    run_id: str
    source_key: str
    revision: str
    manifest_sha256: str
    model_name: str
    license: str = ""
    hub_repo_id: str = ""

    @property
    def recorded_name(self) -> str:
        """The name a logged pipeline records: the hub repo id where the source has one, so that
        MLflow's own `stop` can find the tokenizer online; else the model's name."""
        return self.hub_repo_id or self.model_name

    def lineage_tags(self) -> dict[str, str]:
        """Tags that tie a later step's run to this download and to its model's source."""
        return {
            SOURCE_KEY_TAG: self.source_key,
            REVISION_TAG: self.revision,
            MANIFEST_SHA_TAG: self.manifest_sha256,
            DOWNLOAD_RUN_TAG: self.run_id,
        }


def get_download_run(run_id: str) -> DownloadRun:
    """Look up a `download` run by id.

    Raises:
        UserError: no such run, or it is not a FINISHED download run.
    """
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as error:
        raise UserError(f"download_run_id={run_id!r}: {error.message}") from error
    if run.data.tags.get(STEP_TAG) != "download" or run.info.status != "FINISHED":
        raise UserError(f"download_run_id={run_id!r} is not a FINISHED download run (status {run.info.status})")
    tags = run.data.tags
    # `model_name` is logged by the download step itself, whoever started it; `model` only by `mlflow run`.
    params = run.data.params
    return DownloadRun(
        run_id,
        tags[SOURCE_KEY_TAG],
        tags[REVISION_TAG],
        tags[MANIFEST_SHA_TAG],
        params.get("model_name", ""),
        params.get("license", ""),
        params.get("hub_repo_id", ""),
    )


def download_checkpoint(download_run_id: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Download a `download` run's checkpoint into `dest` and verify it against its manifest.

    Raises:
        UserError: the run has no checkpoint, or a file differs from the manifest.
    """
    manifest_path = _fetch(download_run_id, MANIFEST_NAME, dest, "checkpoint")
    manifest = read_manifest(manifest_path)
    return _fetch_verified(download_run_id, CHECKPOINT_ARTIFACT, manifest["files"], dest, "checkpoint"), manifest


def download_gguf(download_run_id: str, manifest: dict[str, Any], dest: Path) -> Path | None:
    """The GGUF file a `download` run kept of its source, verified against its manifest; None
    when the source was not a GGUF file.

    Raises:
        UserError: the file cannot be fetched or differs from the manifest.
    """
    if GGUF_ARTIFACT not in manifest:
        return None
    files = manifest[GGUF_ARTIFACT]
    return _fetch_verified(download_run_id, GGUF_ARTIFACT, files, dest, "GGUF file") / files[0]["path"]


def _fetch(run_id: str, artifact: str, dest: Path, what: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dest)))
    except MlflowException as error:
        raise UserError(f"download run {run_id}: cannot fetch its {what} ({error.message})") from error


def _fetch_verified(run_id: str, artifact: str, files: list[dict[str, Any]], dest: Path, what: str) -> Path:
    """An artifact folder of a download run, every file checked against its manifest entries."""
    folder = _fetch(run_id, artifact, dest, what)
    problems = verify_folder(folder, {"files": files})
    if problems:
        raise UserError(f"{what} of run {run_id} does not match its manifest: {'; '.join(problems[:5])}")
    return folder


def model_run(model_uri: str) -> Run:
    """The run that logged `model_uri` (`models:/…` or `runs:/…`), for its lineage tags.

    Raises:
        UserError: the URI does not resolve to a logged model.
    """
    try:
        return mlflow.get_run(mlflow.models.get_model_info(model_uri).run_id)
    except MlflowException as error:
        raise UserError(f"model URI {model_uri!r}: {error.message}") from error


def logged_model_name(model_uri: str) -> str:
    """The name a logged chat model answers with (the ONNX wrapper's `model_name`, the pipeline's
    recorded `source_model_name`), read from its MLmodel file alone."""
    flavors = mlflow.models.Model.load(model_uri).flavors
    config = flavors.get("python_function", {}).get("config") or {}
    return str(config.get("model_name") or flavors.get("transformers", {}).get("source_model_name") or "")


def run_name(step: str, subject: str) -> str:
    """What the MLflow UI lists a run as, `log_onnx_wrapper · smollm2-135m`, instead of a random name."""
    return f"{step} · {subject}" if subject else step


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder removed when the step ends, whatever happens."""
    return tempfile.TemporaryDirectory(prefix=f"slmkit-{prefix}-")


@contextlib.contextmanager
def writing_artifacts(what: str) -> Iterator[None]:
    """Turn a failed write into the run's artifact store (full, unwritable, unreachable) into one
    line naming the store; the run then ends FAILED and no step takes its half-written output,
    because the model URI tag (or, for `download`, the manifest) is written only after success.
    """
    try:
        yield
    except (MlflowException, OSError) as error:
        require_tracking_server()  # a lost server is reported as such
        detail = str(getattr(error, "message", error)).strip().splitlines()[0][:300]
        raise UserError(
            f"could not write {what} to the artifact store at {mlflow.get_artifact_uri()}: {detail}. "
            "Check that it is writable and has space, then rerun"
        ) from error
