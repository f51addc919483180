"""The step cache: one reuse rule for `main` and for every step run alone.

A FINISHED step run is reused only when its cache key matches. The key covers:
- the entry point and its normalised params (`0` and `0.0` are the same float; `env_manager`
  and other params that do not change results are left out), upstream run ids and model URIs
  included, since they are params;
- a content hash of the code and config files the step uses, so it works without git, as on
  Databricks, and a touched but identical file changes nothing;
- what else decides the result: the resolved revision of the model source (a new hub commit
  means new work) for `download`, the eval set's content for `evaluate`.

`StepRunner` applies the rule: `main` runs each step through it, and a step run alone with an
empty upstream param (`download_run_id`, `*_model_uri`) asks it for that upstream: the newest
FINISHED run with the upstream's key, computed as `main` would, or a new run of it. Every step
tags its own run with its key (`step_run`; `download` once it has resolved its revision,
`tag_download_key`), whoever started it, so any run can be reused.

`step_lock` serialises work on one key among processes on one machine, so two `main` runs
started together do the step once; the second waits and then reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError
from slmkit.manifest import file_sha256
from slmkit.sources.chat_templates import template_digest
from slmkit.sources.checkpoint import source_revision
from slmkit.sources.eval_set import eval_set_digest
from slmkit.sources.presets import load_presets, resolve_model
from slmkit.workflow.lineage import check_env_manager, run_entry_point, run_name
from slmkit.workflow.steps import CACHE_KEY_TAG, MODEL_URI_TAG, ORDER, SHARED_FILES, STEP_TAG, STEPS

logger = logging.getLogger(__name__)

LOCK_DIR_ENV = "SLMKIT_LOCK_DIR"


def normalize_params(step: str, values: dict[str, str]) -> dict[str, str]:
    """The params that decide `step`'s result, as canonical strings by their declared type.

    Raises:
        UserError: a numeric param does not parse; the message names it.
    """
    normalized = {}
    for param in STEPS[step].params:
        if not param.affects_result:
            continue
        value = values.get(param.name, str(param.default))
        try:
            parsed = param.parse(value)
        except ValueError as error:
            raise UserError(f"{param.name}={value!r}: not a valid {param.type}") from error
        normalized[param.name] = repr(parsed) if param.type == "float" else str(parsed)
    return normalized


def code_files(step: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """The files whose content decides what `step` does: its own, the shared ones, the library."""
    library = sorted((root / "slmkit").rglob("*.py"))
    named = [root / name for name in (*SHARED_FILES, *STEPS[step].code)]
    return sorted({*named, *library})


def code_digest(step: str, root: Path = PROJECT_ROOT) -> str:
    """sha256 over the relative path and content of each of the step's code files."""
    digest = hashlib.sha256()
    for path in code_files(step, root):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def cache_key(step: str, values: dict[str, str], inputs: dict[str, str], root: Path = PROJECT_ROOT) -> str:
    """The cache key of one step run; see the module docstring for what it covers."""
    payload: dict[str, Any] = {
        "step": step,
        "params": normalize_params(step, values),
        "code": code_digest(step, root),
        "upstream": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def download_key_inputs(revision: str, values: dict[str, str]) -> dict[str, str]:
    """What decides a download beyond its params and code: the source's resolved revision, and
    the content of the chat template the params name."""
    inputs = {"source_revision": revision}
    if values.get("chat_template"):
        inputs["chat_template"] = template_digest(values["chat_template"], load_presets())
    return inputs


def key_inputs(step: str, values: dict[str, str]) -> dict[str, str]:
    """What decides a step's result beyond its params and code (see the module docstring)."""
    if step == "download":
        spec = resolve_model(values["model"], values["revision"])
        return download_key_inputs(source_revision(spec.source, values["allow_pickle"] == "true"), values)
    if step == "evaluate":
        return {"eval_set": eval_set_digest(values["eval_set"])}
    return {}


def step_key(step: str, values: dict[str, str]) -> str:
    return cache_key(step, values, key_inputs(step, values))


def forced_steps(force: str) -> frozenset[str]:
    """Which steps `-P force=...` reruns: none (`false`), all (`true`), or one step and those after it."""
    if force in ("", "false"):
        return frozenset()
    if force == "true":
        return frozenset(ORDER)
    if force in ORDER:
        return frozenset(ORDER[ORDER.index(force) :])
    raise UserError(f"force={force!r}: use false, true, or a step name ({', '.join(ORDER)}) to rerun from it")


@contextlib.contextmanager
def step_lock(key: str) -> Iterator[None]:
    """Hold an exclusive lock on `key` among processes on this machine (released on exit or crash)."""
    lock_dir = Path(os.environ.get(LOCK_DIR_ENV, Path.home() / ".cache" / "slmkit" / "locks"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{key}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finished_run_with_key(key: str, experiment_id: str | None) -> str | None:
    """The newest FINISHED run with cache key `key` in the experiment (None: the active one)."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id] if experiment_id else None,
        filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def handed_on(step: str, run_id: str) -> str:
    """What a finished run of `step` hands to later steps: a download's run id, a model's URI."""
    if step == "download":
        return run_id
    return mlflow.get_run(run_id).data.tags[MODEL_URI_TAG]


class StepRunner:
    """Runs or reuses steps by their cache key; `runs` holds the run id each step settled on.

    `run(step, given)` first fills each empty upstream param of `step` the same way (so a step's
    key is the same whether `main` or a step run alone asks for it), then reuses the newest
    FINISHED run with the step's key in the experiment, or runs the entry point under the
    current run. `forced` steps are always run; `on_step` hears of each step once it is settled.
    """

    def __init__(
        self,
        env_manager: str,
        experiment_id: str | None = None,
        forced: frozenset[str] = frozenset(),
        on_step: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.env_manager = check_env_manager(env_manager)
        self.experiment_id, self.forced, self.on_step = experiment_id, forced, on_step
        self.runs: dict[str, str] = {}

    def fill_inputs(self, step: str, given: dict[str, Any]) -> dict[str, str]:
        """`step`'s params from `given` and its defaults, each empty upstream param found or run."""
        values = {name: str(value) for name, value in given.items()}
        for param, upstream in STEPS[step].inputs.items():
            if not values.get(param):
                values[param] = handed_on(upstream, self.run(upstream, values))
        return STEPS[step].values(values)

    def run(self, step: str, given: dict[str, Any]) -> str:
        if step in self.runs:
            return self.runs[step]
        values = STEPS[step].values({**self.fill_inputs(step, given), "env_manager": self.env_manager})
        key = step_key(step, values)
        with step_lock(key):
            found = None if step in self.forced else finished_run_with_key(key, self.experiment_id)
            if found:
                run_id, why = found, f"reused run {found}: a FINISHED run has cache key {key[:12]}"
            else:
                run_id = run_entry_point(step, values, self.env_manager, self.experiment_id)
                reason = "forced" if step in self.forced else f"no FINISHED run has cache key {key[:12]}"
                why = f"ran run {run_id}: {reason}"
        logger.info("%s: %s", step, why)
        self.runs[step] = run_id
        if self.on_step:
            self.on_step(step, run_id, why)
        return run_id


def tag_download_key(values: dict[str, str], revision: str) -> None:
    """Tag the active download run with its cache key, from the revision its fetch resolved.

    Resolving it again when the run starts would cost a second hub call, or a second hash of
    every file of a local folder (7.6 GB for Phi-3-mini) beside the manifest's own."""
    mlflow.set_tag(CACHE_KEY_TAG, cache_key("download", values, download_key_inputs(revision, values)))


@contextlib.contextmanager
def step_run(step: str, values: dict[str, str], subject: str) -> Iterator[mlflow.ActiveRun]:
    """The run of a step, opened by the step itself whoever started it (`mlflow run`, `main`,
    Databricks' run_step.py): named `<step> · <subject>`, tagged with the step and, for cached
    steps, its cache key, and holding every declared param; those `mlflow run` already logged
    keep its value (MLflow refuses to change a param).
    """
    declared = STEPS[step]
    with mlflow.start_run(run_name=run_name(step, subject)) as run:
        tags = {STEP_TAG: step}
        if declared.cached and step != "download":  # download tags its key once fetched: tag_download_key
            tags[CACHE_KEY_TAG] = step_key(step, values)
        mlflow.set_tags(tags)
        logged = mlflow.get_run(run.info.run_id).data.params
        mlflow.log_params({name: value for name, value in declared.values(values).items() if name not in logged})
        yield run
