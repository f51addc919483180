"""Checksummed file manifests: what `download` pinned, and proof that a copy is complete.

A manifest lists every file of a folder with its size and sha256. `download` writes one for the
checkpoint; consumers verify their downloaded copy against it before using a single byte.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> list[dict[str, Any]]:
    """Every file below `folder` as {path, size, sha256}, sorted by POSIX relative path."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entries.append(
            {"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size, "sha256": file_sha256(path)}
        )
    return entries


def folder_bytes(folder: Path, suffix: str = "") -> int:
    """Bytes of every file below `folder` (whose name ends with `suffix`, when given)."""
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}") if p.is_file())


def tree_sha256(files: list[dict[str, Any]]) -> str:
    """One digest for a set of files: the revision of a local folder, which has no commit id."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda e: e["path"]):
        digest.update(f"{entry['path']}\0{entry['size']}\0{entry['sha256']}\n".encode())
    return digest.hexdigest()


def build_manifest(folder: Path, source: dict[str, str], resolved_revision: str) -> dict[str, Any]:
    """The manifest of `folder`: where it came from, the pinned revision, and each file."""
    files = describe_files(folder)
    return {
        "source": source,
        "resolved_revision": resolved_revision,
        "files": files,
        "total_bytes": sum(entry["size"] for entry in files),
        "tree_sha256": tree_sha256(files),
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def is_safe_relative(path: str) -> bool:
    """A manifest path must stay inside its folder: relative, and no `..` part."""
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


def verify_folder(folder: Path, manifest: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Every way `folder` differs from `manifest`, as readable lines; empty means it matches.

    A missing, extra, resized or altered file is named with what was expected, so an error
    built from these lines tells the user which file to look at. A manifest path that would
    escape the folder is reported, never opened. Names in `ignore` (the manifest itself when it
    lives in the folder) are not compared.
    """
    problems, to_hash = _listing_problems(folder, manifest, ignore)
    return problems + _digest_problems(to_hash, [file_sha256(folder / entry["path"]) for entry in to_hash])


def start_verifying(
    folder: Path, manifest: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> Callable[[], list[str]]:
    """`verify_folder` with its sha256s computed in a child process, while this one goes on; the
    function it returns waits for them and gives `verify_folder`'s lines.

    Why: the ONNX wrapper hashes its weights on every load, and onnxruntime-genai holds the GIL
    while it opens the session, so a thread could not hash meanwhile. At Phi-3-mini's size the
    hashes took 1.4 s of a 2.6 s session load; in a child they cost the load nothing. Missing,
    extra and resized files are found here at once, before any file is opened.
    """
    problems, to_hash = _listing_problems(folder, manifest, ignore)
    if not to_hash:
        return lambda: problems
    paths = [folder / entry["path"] for entry in to_hash]

    def hashed_here() -> list[str]:
        return [file_sha256(path) if path.is_file() else "" for path in paths]  # "": vanished meanwhile

    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _SHA256_SCRIPT, *map(str, paths)], stdout=subprocess.PIPE, text=True
        )
    except OSError:  # no child process here: hash in this one, when asked
        return lambda: problems + _digest_problems(to_hash, hashed_here())

    def finish() -> list[str]:
        output, _ = child.communicate()
        digests = output.split()
        if child.returncode != 0 or len(digests) != len(paths):  # the child failed, a file vanished, say
            digests = hashed_here()
        return problems + _digest_problems(to_hash, digests)

    return finish


# The child of `start_verifying`: each named file's sha256, one a line, read as `file_sha256` does.
_SHA256_SCRIPT = f"""
import hashlib, sys
for path in sys.argv[1:]:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read({_CHUNK}):
            digest.update(chunk)
    print(digest.hexdigest())
"""


def _listing_problems(
    folder: Path, manifest: dict[str, Any], ignore: frozenset[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """What the file names and sizes tell (see `verify_folder`), and the entries whose contents
    remain to be compared: the present files of the manifest's size."""
    unsafe = [entry["path"] for entry in manifest["files"] if not is_safe_relative(entry["path"])]
    if unsafe:
        return [f"{path}: unsafe path in the manifest" for path in unsafe], []
    problems, to_hash = [], []
    expected = {entry["path"]: entry for entry in manifest["files"]}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - ignore
    for name in sorted(expected.keys() - present):
        problems.append(f"{name}: missing")
    for name in sorted(present - expected.keys()):
        problems.append(f"{name}: not in the manifest")
    for name in sorted(expected.keys() & present):
        entry = expected[name]
        size = (folder / name).stat().st_size
        if size != entry["size"]:
            problems.append(f"{name}: size {size} bytes, manifest says {entry['size']}")
        else:
            to_hash.append(entry)
    return problems, to_hash


def _digest_problems(entries: list[dict[str, Any]], digests: list[str]) -> list[str]:
    return [
        f"{entry['path']}: sha256 mismatch (manifest {entry['sha256'][:12]}…)"
        for entry, digest in zip(entries, digests, strict=True)
        if digest != entry["sha256"]
    ]
