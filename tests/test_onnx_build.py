"""The builder's command line: int4, the execution provider, and our default extra options."""

from pathlib import Path

from slmkit.onnx_build import DEFAULT_EXTRA_OPTIONS, builder_command


def test_int4_command_names_input_output_precision_and_provider():
    command = builder_command(Path("ckpt"), Path("out"), Path("cache"), "cuda")
    assert command[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert command[command.index("--precision") + 1] == "int4"
    assert command[command.index("--execution_provider") + 1] == "cuda"
    assert "--extra_options" not in command


def test_extra_options_are_key_value_pairs():
    command = builder_command(
        Path("ckpt"), Path("out"), Path("cache"), "cpu", {"accuracy_level": "4", "block_size": "32"}
    )
    assert command[command.index("--extra_options") :] == ["--extra_options", "accuracy_level=4", "block_size=32"]


def test_default_build_uses_int8_activations_like_the_hub_phi3_build():
    assert DEFAULT_EXTRA_OPTIONS == {"accuracy_level": "4"}
