"""The pinned environment, read from conda.yaml, the project's single source of versions.

The logged models carry pip requirements copied from these pins, so a served model runs on
the versions the pipeline was tested with. Run as a module, it prints the pins in
requirements.txt form; the Makefile installs the virtual environment from that output.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from slmkit import PROJECT_ROOT

CONDA_YAML = PROJECT_ROOT / "conda.yaml"

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)==(?P<version>[^\s;]+)$")

# What each logged model needs at serving time; torch stays out of the ONNX model on purpose.
PIPELINE_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy")


def onnx_packages(execution_provider: str) -> tuple[str, ...]:
    """What the ONNX wrapper needs: the CUDA build of onnxruntime-genai brings its own runtime."""
    if execution_provider == "cuda":
        return ("mlflow", "onnxruntime-genai-cuda", "numpy")
    return ("mlflow", "onnxruntime-genai", "onnxruntime", "numpy")


def normalize_name(name: str) -> str:
    """PEP 503 name normalisation, so `huggingface_hub` and `huggingface-hub` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(conda_yaml: Path = CONDA_YAML) -> dict[str, str]:
    """Return {normalised package name: 'name==version'} for every pip pin in conda.yaml.

    Raises:
        ValueError: a pip entry is not pinned with `==`; unpinned entries make runs drift.
    """
    spec = yaml.safe_load(conda_yaml.read_text())
    pins: dict[str, str] = {}
    for dependency in spec.get("dependencies", []):
        if not isinstance(dependency, dict):
            continue
        for requirement in dependency.get("pip", []):
            match = _PIN.match(requirement.strip())
            if not match:
                raise ValueError(f"{conda_yaml}: pip requirement {requirement!r} is not pinned as name==version")
            pins[normalize_name(match["name"])] = requirement.strip()
    return pins


def model_requirements(packages: tuple[str, ...], conda_yaml: Path = CONDA_YAML) -> list[str]:
    """The pinned requirement lines for `packages`, in the given order.

    Args:
        packages: package names; `onnxruntime-genai` may be swapped for `onnxruntime-genai-cuda`,
            which is pinned to the same version as the CPU package.
    """
    pins = read_pins(conda_yaml)
    lines = []
    for package in packages:
        key = normalize_name(package)
        if key == "onnxruntime-genai-cuda":
            version = pins["onnxruntime-genai"].split("==")[1]
            lines.append(f"onnxruntime-genai-cuda=={version}")
        elif key in pins:
            lines.append(pins[key])
        else:
            raise KeyError(f"{package} is not pinned in {conda_yaml}")
    return lines


if __name__ == "__main__":
    sys.stdout.write("\n".join(read_pins(Path(sys.argv[1]) if len(sys.argv) > 1 else CONDA_YAML).values()) + "\n")
