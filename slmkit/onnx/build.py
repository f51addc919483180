"""Getting an ONNX build: the hub's ready variant, or one made with the onnxruntime-genai builder
in one of the quantizations below, the GGUF carry-over (slmkit.onnx.gguf_carry) among them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError
from slmkit.onnx.gguf_carry import CarryReport, carry_gguf_weights
from slmkit.sources.presets import OnnxVariant


@dataclass(frozen=True)
class Quantization:
    """One value of the `quantization` param: the builder's precision and options, and the
    execution providers it runs on."""

    precision: str
    extra_options: dict[str, str] = field(default_factory=dict)
    providers: tuple[str, ...] = ("cpu", "cuda")
    carries_gguf: bool = False


QUANTIZATIONS = {
    # The builder's int4 graph with the GGUF's own weights put in (CPU: the min term is float32).
    "gguf": Quantization("int4", providers=("cpu",), carries_gguf=True),
    "int4": Quantization("int4"),
    "int4-kquant": Quantization("int4", {"algo_config": "k_quant_mixed"}),
    "int8": Quantization("int8"),
    "fp32": Quantization("fp32"),
    "fp16": Quantization("fp16", providers=("cuda",)),
    "bf16": Quantization("bf16", providers=("cuda",)),
}
AUTO = "auto"


def check_quantization(name: str, execution_provider: str, from_gguf: bool) -> str:
    """Refuse a quantization that does not exist, that the provider cannot run, or `gguf` for a
    source that has no GGUF file; each message names the values that work.

    Raises:
        UserError: one line naming the valid values.
    """
    usable = [q for q, spec in QUANTIZATIONS.items() if execution_provider in spec.providers]
    usable = [q for q in usable if from_gguf or not QUANTIZATIONS[q].carries_gguf] + [AUTO]
    if name == AUTO or (name in QUANTIZATIONS and name in usable):
        return name
    if name in QUANTIZATIONS and QUANTIZATIONS[name].carries_gguf and not from_gguf:
        raise UserError(
            f"quantization={name!r} needs a GGUF source (a .gguf file or a GGUF preset); use one of {', '.join(usable)}"
        )
    where = f" on execution_provider={execution_provider}" if name in QUANTIZATIONS else ""
    raise UserError(f"quantization={name!r} is not available{where}: use one of {', '.join(usable)}")


# Files onnxruntime-genai needs at run time; the builder's other outputs are not logged.
RUNTIME_SUFFIXES = (".onnx", ".data", ".json", ".jinja", ".model", ".txt")


# onnxruntime-genai's builder, its quantization pass run one weight at a time (half the memory).
BUILDER_MODULE = "slmkit.onnx.node_by_node_builder"
# BUILDER_MODULE's own options, before the builder's: read the weights from this GGUF file, and
# give the weights that only carried nodes read zero stand-ins (slmkit.onnx.gguf_model).
GGUF_OPTION, STAND_INS_OPTION = "--gguf", "--stand-ins"


def builder_command(
    checkpoint: Path,
    output: Path,
    cache: Path,
    execution_provider: str,
    extra_options: dict[str, str] | None = None,
    precision: str = "int4",
    gguf: Path | None = None,
    stand_ins: bool = False,
) -> list[str]:
    """The builder's command line (its --help crashes; see builder.py's argparse).

    `extra_options` go to `--extra_options key=value ...`, e.g. `accuracy_level` or `block_size`.
    With `gguf`, the builder reads its weights from that file (a GGUF source's checkpoint has
    none), and with `stand_ins` too, for a carry-over, not the weights the carry replaces.
    """
    extra = ["--extra_options", *(f"{key}={value}" for key, value in extra_options.items())] if extra_options else []
    gguf_options = [GGUF_OPTION, str(gguf), *([STAND_INS_OPTION] if stand_ins else [])] if gguf else []
    return [
        sys.executable,
        "-m",
        BUILDER_MODULE,
        *gguf_options,
        "--input", str(checkpoint),
        "--output", str(output),
        "--precision", precision,
        "--execution_provider", execution_provider,
        "--cache_dir", str(cache),
        *extra,
    ]  # fmt: skip


def builder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config as the 0.18 builder needs to read it; transformers 5 reads both alike.

    - Gemma 3: transformers 5 writes `rope_parameters` per layer type (`{"full_attention": {...},
      "sliding_attention": {...}}`), and the builder reads one flat dict (`rope_type` in
      `make_rope_init`, then `rope_theta` and `rope_local_base_freq` as attributes). The flat keys
      go beside the per-type ones, from them: global layers' theta, sliding layers' theta.
    - Mistral with a `sliding_window` and no `layer_types`: the builder windows only the layers
      `layer_types` names, so every layer is named sliding, as transformers windows them.
    """
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    if {"full_attention", "sliding_attention"} <= set(rope):
        full, sliding = rope["full_attention"], rope["sliding_attention"]
        config["rope_parameters"] = {**rope, "rope_type": full.get("rope_type", "default"),
                                     "rope_theta": full["rope_theta"], "rope_local_base_freq": sliding["rope_theta"]}  # fmt: skip
    if config.get("model_type") == "mistral" and config.get("sliding_window") and not config.get("layer_types"):
        config["layer_types"] = ["sliding_attention"] * config["num_hidden_layers"]
    return config


def builder_input(checkpoint: Path, scratch: Path) -> Path:
    """The folder the builder reads: the checkpoint itself, or, where its config needs
    `builder_config`'s changes, a folder of links to its files with the changed config.json (the
    checkpoint stays as it was logged)."""
    config = json.loads((checkpoint / "config.json").read_text())
    changed = builder_config(config)
    if changed == config:
        return checkpoint
    folder = scratch / "builder-input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path.resolve())
    (folder / "config.json").write_text(json.dumps(changed, indent=2))
    return folder


def builder_environment() -> dict[str, str]:
    """The builder's environment: this one, offline, since it reads a local checkpoint only.

    Without a git repository: the 0.18 builder stamps `producer_version` with `git rev-parse HEAD`
    run five folders above its own file (`builders/base.py`, `get_genai_commit`), which inside a
    project's `.venv` is the project's own checkout, so every commit of ours changed the built
    model.onnx. With no repository it takes the wheel's commit, and the same checkpoint builds the
    same bytes.

    The project's root goes first on PYTHONPATH, so that `BUILDER_MODULE` is found from any
    working directory."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GIT_DIR": os.devnull, "PYTHONPATH": path}


def build_onnx(
    quantization: str,
    checkpoint: Path,
    output: Path,
    scratch: Path,
    execution_provider: str,
    gguf: Path | None = None,
    extra_options: dict[str, str] | None = None,
) -> CarryReport | None:
    """Build an ONNX model of a safetensors checkpoint into `output` in `quantization`.

    With `gguf` (a GGUF source), the builder reads its weights from the file, `checkpoint` giving
    the config (slmkit.onnx.gguf_model). For `gguf`, its int4 graph then gets the file's own
    blocks, checked against gguf's dequantization; the report says which nodes were carried.

    The builder runs in a subprocess: it holds the whole float model in memory, and the memory
    comes back to the OS when it exits. Its log tail is kept for the error message.

    Raises:
        UserError: the builder failed; the message carries the end of its output.
    """
    recipe = QUANTIZATIONS[quantization]
    if recipe.carries_gguf and gguf is None:
        raise UserError("quantization='gguf' needs the source's GGUF file, which the download run does not have")
    build_dir = scratch / f"builder-output-{quantization}"
    command = builder_command(
        builder_input(checkpoint, scratch),
        build_dir,
        scratch / "builder-cache",
        execution_provider,
        {**recipe.extra_options, **(extra_options or {})},
        recipe.precision,
        gguf,
        recipe.carries_gguf,
    )
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=builder_environment())
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise UserError(f"onnxruntime-genai's builder failed on {checkpoint} (exit {result.returncode}):\n{tail}")
    report = carry_gguf_weights(build_dir, gguf, checkpoint) if recipe.carries_gguf else None  # gguf checked above
    copy_runtime_files(build_dir, output, move=True)
    shutil.rmtree(build_dir)
    return report


def copy_runtime_files(source: Path, output: Path, move: bool = False) -> None:
    """Copy the files onnxruntime-genai loads, or with `move` move them (a build's own scratch
    output: a copy of an fp32 build's weights is 15 GB more disk at Phi-3-mini's size); refuse a
    folder without genai_config.json."""
    if not (source / "genai_config.json").is_file():
        raise UserError(f"{source} has no genai_config.json; it is not an onnxruntime-genai model folder")
    output.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in RUNTIME_SUFFIXES:
            (shutil.move if move else shutil.copy2)(path, output / path.name)


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
