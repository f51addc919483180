"""Getting an int4 ONNX build: the hub's ready variant, or one made with the onnxruntime-genai builder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from slmkit.errors import UserError
from slmkit.presets import OnnxVariant

# Files onnxruntime-genai needs at run time; the builder's other outputs are not logged.
RUNTIME_SUFFIXES = (".onnx", ".data", ".json", ".jinja", ".model", ".txt")


def builder_command(
    checkpoint: Path, output: Path, cache: Path, execution_provider: str, extra_options: dict[str, str] | None = None
) -> list[str]:
    """The builder's command line for an int4 build (its --help crashes; see builder.py's argparse).

    `extra_options` go to `--extra_options key=value ...`, e.g. `accuracy_level` or `block_size`.
    """
    extra = ["--extra_options", *(f"{key}={value}" for key, value in extra_options.items())] if extra_options else []
    return [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "--input", str(checkpoint),
        "--output", str(output),
        "--precision", "int4",
        "--execution_provider", execution_provider,
        "--cache_dir", str(cache),
        *extra,
    ]  # fmt: skip


def build_int4(
    checkpoint: Path, output: Path, scratch: Path, execution_provider: str, extra_options: dict[str, str] | None = None
) -> None:
    """Build an int4 ONNX model of a safetensors checkpoint into `output`.

    `extra_options` (e.g. `accuracy_level`, `block_size`) change the builder's defaults, which
    `make bench` compares; none is set by default because none both held parity and was faster
    beyond the noise of two runs.

    The builder runs in a subprocess: it holds the whole float model in memory, and the memory
    comes back to the OS when it exits. Its log tail is kept for the error message.

    Raises:
        UserError: the builder failed; the message carries the end of its output.
    """
    build_dir = scratch / "builder-output"
    result = subprocess.run(
        builder_command(
            checkpoint,
            build_dir,
            scratch / "builder-cache",
            execution_provider,
            extra_options,
        ),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise UserError(f"onnxruntime-genai's builder failed on {checkpoint} (exit {result.returncode}):\n{tail}")
    copy_runtime_files(build_dir, output)


def copy_runtime_files(source: Path, output: Path) -> None:
    """Copy the files onnxruntime-genai loads; refuse a folder without genai_config.json."""
    if not (source / "genai_config.json").is_file():
        raise UserError(f"{source} has no genai_config.json; it is not an onnxruntime-genai model folder")
    output.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in RUNTIME_SUFFIXES:
            shutil.copy2(path, output / path.name)


def fetch_ready_variant(variant: OnnxVariant, execution_provider: str, output: Path) -> str:
    """Download the hub's ready int4 build for `execution_provider`; return its commit sha."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    subfolder = variant.subfolders[execution_provider]
    try:
        commit = HfApi().model_info(variant.repo_id, revision=variant.revision).sha
        snapshot = Path(snapshot_download(variant.repo_id, revision=commit, allow_patterns=[f"{subfolder}/*"]))
    except HfHubHTTPError as error:
        raise UserError(f"hub repo {variant.repo_id}@{variant.revision}: the hub answered {error}") from error
    except (HTTPError, OSError) as error:
        raise UserError(
            f"cannot reach the Hugging Face Hub for {variant.repo_id} ({error}); "
            "pass -P onnx_source=build to build the ONNX model from the downloaded checkpoint instead"
        ) from error
    copy_runtime_files(snapshot / subfolder, output)
    return commit
