"""Manifests: every file's size and sha256, and verification that names what differs."""

import hashlib
from pathlib import Path

import pytest

from slmkit.manifest import build_manifest, read_manifest, start_verifying, verify_folder, write_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.safetensors").write_bytes(b"\x00" * 1000)
    return root


def test_manifest_lists_each_file_with_size_and_sha256(folder: Path):
    manifest = build_manifest(folder, {"kind": "local_dir"}, "rev1")
    assert [f["path"] for f in manifest["files"]] == ["config.json", "sub/weights.safetensors"]
    weights = manifest["files"][1]
    assert weights["size"] == 1000
    assert weights["sha256"] == hashlib.sha256(b"\x00" * 1000).hexdigest()
    assert manifest["total_bytes"] == 1008
    assert manifest["resolved_revision"] == "rev1"


def test_manifest_round_trips_and_verifies_clean(folder: Path, tmp_path: Path):
    path = tmp_path / "manifest.json"
    write_manifest(path, build_manifest(folder, {}, "r"))
    assert verify_folder(folder, read_manifest(path)) == []


def test_verify_names_altered_missing_and_extra_files(folder: Path):
    manifest = build_manifest(folder, {}, "r")
    (folder / "config.json").write_text('{"a": 2}')  # same size, other bytes
    (folder / "sub" / "weights.safetensors").unlink()
    (folder / "extra.txt").write_text("x")
    assert verify_folder(folder, manifest) == [
        "sub/weights.safetensors: missing",
        "extra.txt: not in the manifest",
        "config.json: sha256 mismatch (manifest " + manifest["files"][0]["sha256"][:12] + "…)",
    ]


def test_verifying_in_a_child_process_names_the_same_differences(folder: Path):
    manifest = build_manifest(folder, {}, "r")
    assert start_verifying(folder, manifest)() == []
    (folder / "config.json").write_text('{"a": 2}')  # same size, other bytes
    (folder / "sub" / "weights.safetensors").write_bytes(b"\x00" * 999)
    (folder / "extra.txt").write_text("x")
    assert (
        start_verifying(folder, manifest)()
        == verify_folder(folder, manifest)
        == [
            "extra.txt: not in the manifest",
            "sub/weights.safetensors: size 999 bytes, manifest says 1000",
            "config.json: sha256 mismatch (manifest " + manifest["files"][0]["sha256"][:12] + "…)",
        ]
    )


def test_tree_sha256_ignores_touching_but_not_content(folder: Path):
    before = build_manifest(folder, {}, "r")["tree_sha256"]
    (folder / "config.json").touch()
    assert build_manifest(folder, {}, "r")["tree_sha256"] == before
    (folder / "config.json").write_text('{"a": 3}')
    assert build_manifest(folder, {}, "r")["tree_sha256"] != before


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/passwd", "sub/../../x", ""])
def test_manifest_paths_that_escape_the_folder_are_reported_not_opened(folder: Path, path: str):
    manifest = {"files": [{"path": path, "size": 1, "sha256": "0" * 64}]}
    assert verify_folder(folder, manifest) == [f"{path}: unsafe path in the manifest"]


def test_ignored_names_are_not_compared(folder: Path):
    manifest = build_manifest(folder, {}, "r")
    (folder / "manifest.json").write_text("{}")
    assert verify_folder(folder, manifest, ignore=frozenset({"manifest.json"})) == []
