"""How a model's rows behave in batches on this machine (`slmkit.onnx.batching.batch_behaviour`),
measured once per model, runtime, CPU and thread count, and kept on disk for later loads.

Why: the measure runs the model on batches of 1 to 4 one-token rows at every load: 0.08 s of the
0.47 s that SmolLM2's wrapper takes from `load_model` to its first token (untraced, without
MLflow's requirement check; the bare onnxruntime-genai loop takes 0.37 s), 0.37 s at
Phi-3-mini's size, and again in every Spark worker of `batch_infer`. Its answer depends only on
the model's files, the onnxruntime and onnxruntime-genai builds, the CPU (MLAS picks its kernels
by instruction set) and the intra-op threads, which make up the key. The files enter the key
through their manifest's sha256s, so only a folder checked against its manifest at load
(`SLMKIT_VERIFY_ONNX`, on by default) may use a kept answer: a changed file fails that check.

The folder is $SLMKIT_BEHAVIOUR_CACHE, else ~/.cache/slmkit/batch-behaviour (under
$XDG_CACHE_HOME where set); `off` (or 0, false, no) measures at every load. A folder that cannot
be written only means measuring again next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from slmkit.onnx.batching import BEHAVIOURS, batch_behaviour, batch_logits, switched_off
from slmkit.onnx.session import ModelTokens

logger = logging.getLogger(__name__)

BEHAVIOUR_CACHE_ENV = "SLMKIT_BEHAVIOUR_CACHE"


def cache_folder() -> Path | None:
    """Where kept answers live; None when SLMKIT_BEHAVIOUR_CACHE is `off`."""
    configured = os.environ.get(BEHAVIOUR_CACHE_ENV, "")
    if switched_off(configured):
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slmkit" / "batch-behaviour"


def cpu_identity() -> str:
    """The CPU's model name and instruction-set flags (Linux), else what `platform` says of it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    first: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in lines):
        if key.strip() in wanted:
            first.setdefault(key.strip(), value.strip())
    return " | ".join(first.get(key, "") for key in wanted)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def behaviour_key(manifest: bytes, sizes: Sequence[int], threads: int) -> dict[str, Any]:
    """What the measured behaviour depends on: the model's files (their manifest), the runtime,
    the CPU, the batch sizes measured and the intra-op threads."""
    import onnxruntime_genai as og

    return {
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "onnxruntime_genai": og.__version__,
        "onnxruntime": _version("onnxruntime"),
        "machine": platform.machine(),
        "cpu": cpu_identity(),
        "sizes": sorted(sizes),
        "intra_op_threads": threads,
    }


def kept_batch_behaviour(
    manifest_path: Path, model: Any, tokens: ModelTokens, sizes: Sequence[int], threads: int
) -> str:
    """`batch_behaviour` of `model` over `sizes`: the kept answer for this key, else measured
    (and kept). `manifest_path` is the manifest the model's folder was checked against."""
    key = behaviour_key(manifest_path.read_bytes(), sizes, threads)
    folder = cache_folder()
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = None if folder is None else folder / f"{name}.json"
    if path is not None:
        try:
            kept = json.loads(path.read_text())
            if kept.get("key") == key and kept.get("behaviour") in BEHAVIOURS:
                return kept["behaviour"]
        except (OSError, ValueError, AttributeError):
            pass  # nothing kept, or not readable as kept: measured below
    behaviour = batch_behaviour(batch_logits(model, tokens, sizes))
    if path is not None:
        _write_atomically(path, json.dumps({"behaviour": behaviour, "key": key}, indent=1))
    return behaviour


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a half-written answer must not be read as kept."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("batch behaviour not kept in %s: %s", path.parent, error)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
