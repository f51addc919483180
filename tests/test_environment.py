"""conda.yaml is the one source of versions; logged models copy its pins."""

from pathlib import Path

import pytest

from slmkit.environment import PIPELINE_PACKAGES, model_requirements, onnx_packages, read_pins


def test_every_pip_dependency_is_pinned_and_the_runtime_is_there():
    pins = read_pins()
    assert pins["mlflow"].startswith("mlflow==")
    assert pins["torch"] == "torch==2.13.0"
    assert pins["onnxruntime-genai"].startswith("onnxruntime-genai==")
    assert pins["huggingface-hub"].startswith("huggingface_hub==")


def test_onnx_model_requirements_leave_torch_out():
    cpu = model_requirements(onnx_packages("cpu"))
    assert not any(line.startswith("torch") for line in cpu)
    assert read_pins()["onnxruntime-genai"] in cpu


def test_cuda_requirements_pin_the_cuda_build_to_the_same_version():
    cuda = model_requirements(onnx_packages("cuda"))
    version = read_pins()["onnxruntime-genai"].split("==")[1]
    assert f"onnxruntime-genai-cuda=={version}" in cuda
    assert not any(line.startswith("onnxruntime==") for line in cuda)


def test_pipeline_requirements_include_torch_and_transformers():
    lines = model_requirements(PIPELINE_PACKAGES)
    assert read_pins()["torch"] in lines
    assert read_pins()["transformers"] in lines


def test_unpinned_requirement_is_refused(tmp_path: Path):
    conda = tmp_path / "conda.yaml"
    conda.write_text("dependencies:\n  - python=3.11\n  - pip:\n      - mlflow>=3\n")
    with pytest.raises(ValueError, match="not pinned"):
        read_pins(conda)
