"""The step cache of `main`: a key that changes whenever a step's result could change.

A FINISHED step run is reused only when its cache key matches. The key covers:
- the entry point and its normalised params (`0` and `0.0` are the same float; `env_manager`
  and other settings that do not change results are left out);
- a content hash of the code and config files the step uses, so it works without git, as on
  Databricks, and a touched but identical file changes nothing;
- the upstream inputs: run ids and model URIs of earlier steps, the eval set's content, and
  the resolved revision of the model source (a new hub commit means new work).

`step_lock` serialises work on one key among processes on one machine, so two `main` runs
started together do the step once; the second waits and then reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError
from slmkit.manifest import file_sha256

CACHE_KEY_TAG = "slmkit.cache_key"
STEPS = ("download", "log_pipeline", "log_onnx_wrapper", "evaluate")
# Params that choose how a step runs, not what it produces.
IGNORED_PARAMS = frozenset({"env_manager"})
# Files every step depends on, and each step's own files, relative to the project root.
SHARED_FILES = ("MLproject", "conda.yaml", "config/presets.yaml")
STEP_FILES = {
    "download": ("steps/download.py",),
    "log_pipeline": ("steps/log_pipeline.py",),
    "log_onnx_wrapper": ("steps/log_onnx_wrapper.py", "wrappers/onnx_chat_model.py"),
    "evaluate": ("steps/evaluate.py",),
}
LOCK_DIR_ENV = "SLMKIT_LOCK_DIR"


def parameter_types(step: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The MLproject type of each param of `step`."""
    spec = yaml.safe_load((root / "MLproject").read_text())
    return {name: raw.get("type", "string") for name, raw in spec["entry_points"][step]["parameters"].items()}


def normalize_params(params: dict[str, str], types: dict[str, str]) -> dict[str, str]:
    """Params as canonical strings by their MLproject type, without the ignored ones.

    Raises:
        UserError: a numeric param does not parse; the message names it.
    """
    normalized = {}
    for name, value in params.items():
        if name in IGNORED_PARAMS:
            continue
        kind = types.get(name, "string")
        try:
            if kind == "float":
                normalized[name] = repr(float(value))
            elif kind == "int":
                normalized[name] = str(int(value))
            else:
                normalized[name] = str(value)
        except ValueError as error:
            raise UserError(f"{name}={value!r}: not a valid {kind}") from error
    return normalized


def code_files(step: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """The files whose content decides what `step` does: its own, the shared ones, the library."""
    library = sorted((root / "slmkit").rglob("*.py"))
    named = [root / name for name in (*SHARED_FILES, *STEP_FILES[step])]
    return sorted({*named, *library})


def code_digest(step: str, root: Path = PROJECT_ROOT) -> str:
    """sha256 over the relative path and content of each of the step's code files."""
    digest = hashlib.sha256()
    for path in code_files(step, root):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def cache_key(step: str, params: dict[str, str], upstream: dict[str, str], root: Path = PROJECT_ROOT) -> str:
    """The cache key of one step run; see the module docstring for what it covers."""
    payload: dict[str, Any] = {
        "step": step,
        "params": normalize_params(params, parameter_types(step, root)),
        "code": code_digest(step, root),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def forced_steps(force: str) -> frozenset[str]:
    """Which steps `-P force=...` reruns: none (`false`), all (`true`), or one step and those after it."""
    if force in ("", "false"):
        return frozenset()
    if force == "true":
        return frozenset(STEPS)
    if force in STEPS:
        return frozenset(STEPS[STEPS.index(force) :])
    raise UserError(f"force={force!r}: use false, true, or a step name ({', '.join(STEPS)}) to rerun from it")


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
