"""The builder's command line: int4, the execution provider, and our default extra options."""

from pathlib import Path

from slmkit.onnx.build import builder_command
from slmkit.onnx.session import THREADS_ENV


def test_int4_command_names_input_output_precision_and_provider():
    command = builder_command(Path("ckpt"), Path("out"), Path("cache"), "cuda")
    assert command[1:3] == ["-m", "slmkit.onnx.node_by_node_builder"]
    assert command[command.index("--precision") + 1] == "int4"
    assert command[command.index("--execution_provider") + 1] == "cuda"
    assert "--extra_options" not in command


def test_extra_options_are_key_value_pairs():
    command = builder_command(
        Path("ckpt"), Path("out"), Path("cache"), "cpu", {"accuracy_level": "4", "block_size": "32"}
    )
    assert command[command.index("--extra_options") :] == ["--extra_options", "accuracy_level=4", "block_size=32"]


def test_intra_op_threads_default_to_the_available_cpus_and_can_be_overridden(monkeypatch):
    import os

    from slmkit.onnx.session import intra_op_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert intra_op_threads() == len(os.sched_getaffinity(0))
    assert intra_op_threads(3) == 3
    monkeypatch.setenv(THREADS_ENV, "1")
    assert intra_op_threads(3) == 1


def test_a_builds_runtime_files_are_moved_into_place_and_a_downloads_are_copied(tmp_path):
    from slmkit.onnx.build import copy_runtime_files

    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "builder.log"):
        (tmp_path / "built").mkdir(exist_ok=True)
        (tmp_path / "built" / name).write_text(name)
    copy_runtime_files(tmp_path / "built", tmp_path / "copied")
    assert sorted(p.name for p in (tmp_path / "built").iterdir()) == ["builder.log", "genai_config.json", "model.onnx", "model.onnx.data"]  # fmt: skip
    copy_runtime_files(tmp_path / "built", tmp_path / "moved", move=True)
    assert [p.name for p in (tmp_path / "built").iterdir()] == ["builder.log"]
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
    ]
    assert (tmp_path / "moved" / "model.onnx.data").read_text() == "model.onnx.data"
