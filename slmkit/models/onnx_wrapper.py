"""How the ONNX chat wrapper is packaged as an MLflow model, in one place.

`log_onnx_wrapper` passes these arguments to `mlflow.pyfunc.log_model`; tests and benchmarks pass
the same ones to `mlflow.pyfunc.save_model`, so every copy of the wrapper is packaged alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmkit import LIBRARY, PROJECT_ROOT
from slmkit.chat.contract import chat_signature
from slmkit.chat.model_config import TRACING_KEY
from slmkit.environment import model_requirements, onnx_packages
from slmkit.manifest import MANIFEST_NAME, build_manifest, write_manifest

WRAPPER = PROJECT_ROOT / "wrappers" / "onnx_chat_model.py"
ONNX_ARTIFACT = "onnx_model"
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}


def seal_onnx_folder(onnx_dir: Path, origin: str, revision: str) -> dict[str, Any]:
    """Write the folder's manifest (each file's size and sha256), which the wrapper checks at load."""
    manifest = build_manifest(onnx_dir, {"origin": origin}, revision)
    write_manifest(onnx_dir / MANIFEST_NAME, manifest)
    return manifest


def wrapper_model_arguments(
    onnx_dir: Path, model_name: str, generation: dict[str, Any], execution_provider: str = "cpu", tracing: bool = True
) -> dict[str, Any]:
    """Keyword arguments for `mlflow.pyfunc.log_model`/`save_model` of the ONNX wrapper.

    The wrapper goes in as code (models-from-code, never a pickle) with the slmkit package as
    code path, the ONNX folder as the `onnx_model` artifact, the explicit chat signature and pip
    requirements pinned from conda.yaml, without torch.
    """
    return {
        "python_model": str(WRAPPER),
        "artifacts": {ONNX_ARTIFACT: str(onnx_dir)},
        "code_paths": [str(LIBRARY)],
        "signature": chat_signature(),
        "input_example": INPUT_EXAMPLE,
        "pip_requirements": model_requirements(onnx_packages(execution_provider)),
        "model_config": {"model_name": model_name, TRACING_KEY: str(tracing).lower(), **generation},
    }


def onnx_folder(model_dir: Path) -> Path:
    """The ONNX folder inside a local copy of a logged wrapper (its `onnx_model` artifact)."""
    import yaml

    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    return model_dir / flavor["artifacts"][ONNX_ARTIFACT]["path"]
