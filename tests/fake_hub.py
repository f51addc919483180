"""A Hugging Face Hub stand-in on 127.0.0.1, for the hub code path without the internet.

It answers the requests huggingface_hub makes for `model_info`, `snapshot_download` and
`hf_hub_download` (repo info, tree listing, HEAD and ranged GET of `resolve/`), with commit
ids, git blob ids and LFS sha256s computed from the files it serves. A test points HF_ENDPOINT
at it and injects faults: a connection dropped partway through a file, or bytes that differ from
the advertised sha256. Every request is recorded, so a test can assert that none was made.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Files the real hub stores with LFS in a model repo; the rest are plain git blobs.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".data")


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeHub:
    """One repo, `repo_id`, whose branches and tags all point at one commit of `folder`'s files."""

    repo_id: str
    folder: Path
    refs: tuple[str, ...] = ("main",)
    # Faults, set by a test: close the connection after this many bytes of a file, once.
    drop_after_bytes: dict[str, int] = field(default_factory=dict)
    # Faults, set by a test: serve these bytes instead of the file's (its metadata stays true).
    tampered: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.files = {path.name: path.read_bytes() for path in sorted(self.folder.iterdir()) if path.is_file()}
        self.commit = hashlib.sha1(json.dumps(sorted(self.sha256s().items())).encode()).hexdigest()

    def sha256s(self) -> dict[str, str]:
        return {name: hashlib.sha256(content).hexdigest() for name, content in self.files.items()}

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision in (*self.refs, self.commit) else None

    def entry(self, name: str) -> dict:
        """A file as the tree listing describes it; `lfs.oid` is the sha256 of its content."""
        content = self.files[name]
        described = {"type": "file", "path": name, "size": len(content), "oid": git_blob_id(content)}
        if name.endswith(LFS_SUFFIXES):
            described["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return described

    def sibling(self, name: str) -> dict:
        """A file as repo info with `files_metadata` describes it."""
        tree = self.entry(name)
        described = {"rfilename": name, "size": tree["size"], "blobId": tree["oid"]}
        if "lfs" in tree:
            described["lfs"] = {"sha256": tree["lfs"]["oid"], "size": tree["size"], "pointerSize": 134}
        return described


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, code: str, message: str) -> None:
        self._send_json(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        hub = self.hub
        path = self.path.split("?", 1)[0]
        hub.requests.append(f"{self.command} {path}")
        repo = re.escape(hub.repo_id)
        if match := re.fullmatch(rf"/api/models/{repo}/revision/([^/]+)", path):
            commit = hub.resolve(match[1])
            if commit is None:
                return self._not_found("RevisionNotFound", f"Invalid rev id: {match[1]}")
            siblings = [hub.sibling(name) for name in hub.files]
            return self._send_json(
                200, {"id": hub.repo_id, "modelId": hub.repo_id, "sha": commit, "siblings": siblings}
            )
        if match := re.fullmatch(rf"/api/models/{repo}/tree/([^/]+)", path):
            if hub.resolve(match[1]) is None:
                return self._not_found("RevisionNotFound", f"Invalid rev id: {match[1]}")
            return self._send_json(200, [hub.entry(name) for name in hub.files])
        if match := re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path):
            return self._file(match[1], match[2])
        if path.startswith("/api/models/") or path.startswith(f"/{hub.repo_id}/"):
            return self._not_found("RepoNotFound", "Repository not found")
        return self._not_found("EntryNotFound", f"no route {path}")

    def _file(self, revision: str, name: str) -> None:
        hub = self.hub
        commit = hub.resolve(revision)
        if commit is None:
            return self._not_found("RevisionNotFound", f"Invalid rev id: {revision}")
        if name not in hub.files:
            return self._not_found("EntryNotFound", f"{name} does not exist")
        entry = hub.entry(name)
        content = hub.tampered.get(name, hub.files[name])
        start = 0
        if range_header := self.headers.get("Range"):
            start = int(re.fullmatch(r"bytes=(\d+)-\d*", range_header)[1])
        body = content[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]}"')
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
            self.send_header("X-Linked-Size", str(entry["size"]))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = hub.drop_after_bytes.pop(name, None)
        if cut is not None and cut < len(body):
            # Promise the whole body, send part of it, hang up: what a dropped connection looks like.
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve `hub` on a free port of 127.0.0.1; `hub.url` is the HF_ENDPOINT to use."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
