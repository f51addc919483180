"""`python -m bench --scale phi3-mini`: the figures at the flagship's size (issue 16).

SmolLM2's int4 build is 86 MB, so fixed costs dominate its figures. Here the same measurements
run on a checkpoint of Phi-3-mini-4k-instruct's shape with seeded random weights
(bench/flagship.py, built once into the bench cache): speed, memory and overheads do not depend
on the weights' values. In one run, side by side:

- our ONNX builds through the `log_onnx_wrapper` step itself (each quantization of
  slmkit.onnx.build that fits in memory, the GGUF carry-over of llama.cpp's Q4_0 and Q4_1 files
  among them), with the step's own build and log times against a plain copy, and each
  process tree's peak resident memory;
- the GGUF files made by llama.cpp's own `convert_hf_to_gguf.py` and `llama-quantize`;
- cold start of the wrapper against the bare loop, decode of the wrapper against the bare loop,
  our served int4 build against `llama-server` on the Q4_0 file and each GGUF carry-over against
  `llama-server` on its own file, at 1 and at 4 clients, prompt processing of a 1,000-token
  prompt, decode against the memory-bandwidth limit, and the Q4_0 matrix products alone on
  onnxruntime's kernel and on llama.cpp's (bench/kernels.py).

A command that would need more memory than the machine has is stopped before it runs out
(bench.figures.watched) and reported with its measured peak; `--layers` cuts the model to its
first layers, every other size kept, to run the largest part that fits.

`LLAMA_SERVER` names llama.cpp's `llama-server` binary, built in llama.cpp's source tree (bench/README.md:
building llama-server); `llama-quantize` and `convert_hf_to_gguf.py` are found in the same tree.
Without it the llama.cpp figures and the GGUF carry-over are skipped, and the run says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests

from bench.batching import prompt_and_step_ms
from bench.figures import (
    GGUF_TYPES,
    PROMPTS,
    RESULTS,
    Figure,
    Sitting,
    Watched,
    aggregate_rate,
    bare_generate,
    carried_served_figure,
    cold_start_figures,
    decode_rates,
    gguf_bytes_per_token,
    memory_bandwidth,
    onnx_bytes_per_token,
    profile_to,
    served_generate,
    timed,
    watched,
    wrapper_over_bare,
)
from bench.flagship import COMPLETE, PHI3_MINI_CONFIG, bench_cache, build_phi3_mini, synthetic_corpus
from bench.kernels import q4_0_kernel_figures
from bench.quality import LLAMA_SERVER_ENV, llama_server
from harness.servers import SLMKIT_SERVE, served, stop_process
from slmkit import PROJECT_ROOT
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT
from slmkit.onnx.greedy import load
from slmkit.onnx.session import model_tokens
from slmkit.workflow.steps import MODEL_URI_TAG, STEP_TAG

EXPERIMENT = "bench-phi3-mini"
# Builds from the bf16 checkpoint besides int4, the slowest last: k-quant searches each block's
# scales (~4x int4's builder time at 2 layers; at 32 it was stopped for memory after 20 minutes).
QUANTIZATIONS = ("int8", "fp32", "int4-kquant")
PROMPT_TOKENS = 1000


@dataclass(frozen=True)
class Build:
    """One ONNX model that `log_onnx_wrapper` logged, or why it could not."""

    label: str
    run: Watched
    model_dir: Path | None = None
    model_uri: str = ""
    download_run_id: str = ""
    build_seconds: float = 0.0
    log_seconds: float = 0.0
    size_bytes: int = 0
    bare_decode_tok_s: float | None = None
    download: Watched | None = None  # the `download` step before it (a lookup when reused)
    served_tok_s: dict[int, float] | None = None  # through `slmkit.serve`'s /v1, by client count

    @property
    def onnx_dir(self) -> Path:
        assert self.model_dir is not None
        return self.model_dir / "artifacts" / ONNX_ARTIFACT

    def row(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"step_seconds": self.run.seconds, "peak_rss_bytes": self.run.peak_rss_bytes}
        if self.download is not None:
            facts |= {"download_s": self.download.seconds, "download_peak_rss_bytes": self.download.peak_rss_bytes}
        if self.model_dir is None:
            return {**facts, "failed": self.run.why_not()}
        facts |= {"build_s": self.build_seconds, "log_s": self.log_seconds, "size_bytes": self.size_bytes}
        if self.bare_decode_tok_s is not None:
            facts["bare_decode_tok_s"] = self.bare_decode_tok_s
        return facts if self.served_tok_s is None else {**facts, "served_tok_s": self.served_tok_s}


@dataclass(frozen=True)
class Scale(Sitting):
    """What the figures share: the sitting, and the checkpoint they are measured on."""

    checkpoint: Path

    @property
    def profile_stem(self) -> Path:
        return RESULTS / f"{self.stamp}-phi3-mini"


def step(scale: Scale, name: str, *args: str) -> Watched:
    """One step of the project as `mlflow run` starts it (`python -m steps.<name>`), watched.
    Its temporary folders go under the scratch folder, which is removed with it: a step stopped
    for memory cannot remove its own (7 GB of checkpoint copy at 32 layers)."""
    command = [sys.executable, "-m", f"steps.{name}", *args]
    scratch = scale.work / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**scale.env, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT, "TMPDIR": str(scratch)}
    return watched(command, env, cwd=PROJECT_ROOT)


def newest_step_run(name: str):
    import mlflow

    [run] = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.`{STEP_TAG}` = '{name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return run


def log_onnx(scale: Scale, label: str, source: Path, quantization: str) -> Build:
    """`download` (reused when its key matches) then `log_onnx_wrapper` of `source`, each watched;
    the logged model is fetched into the scratch folder."""
    import mlflow

    fetched = step(scale, "download", "--model", str(source))
    if not fetched.ok:
        return Build(label, fetched)
    logged = step(
        scale, "log_onnx_wrapper", "--model", str(source), "--onnx-source", "build", "--quantization", quantization
    )
    if not logged.ok:
        return Build(label, logged, download=fetched)
    run = newest_step_run("log_onnx_wrapper")
    model_dir, model_uri = scale.work / f"onnx-model-{label}", run.data.tags[MODEL_URI_TAG]
    mlflow.artifacts.download_artifacts(model_uri, dst_path=str(model_dir))
    metrics = run.data.metrics
    return Build(
        label,
        logged,
        model_dir,
        model_uri,
        run.data.params["download_run_id"],
        metrics["build_seconds"],
        metrics["log_seconds"],
        int(metrics["model_size_bytes"]),
        download=fetched,
    )


def drop(build: Build, download_too: bool) -> None:
    """Free the scratch disk of a measured build: its fetched folder, the logged model's
    artifacts, and with `download_too` its download run's checkpoint (a GGUF source's is float32,
    15 GB at 32 layers)."""
    import mlflow
    from mlflow.utils.file_utils import local_file_uri_to_path

    if build.model_dir is None:
        return
    shutil.rmtree(build.model_dir)
    logged = mlflow.get_logged_model(build.model_uri.removeprefix("models:/"))
    shutil.rmtree(local_file_uri_to_path(logged.artifact_location), ignore_errors=True)
    if download_too:
        artifacts = mlflow.get_run(build.download_run_id).info.artifact_uri
        shutil.rmtree(local_file_uri_to_path(artifacts), ignore_errors=True)


def release_memory() -> None:
    """Hand freed memory back to the OS between figures, so the next build has the machine."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class LlamaCpp:
    """llama.cpp's tools in one built source tree."""

    server: Path
    quantize: Path
    converter: Path

    @classmethod
    def from_env(cls) -> LlamaCpp | None:
        binary = os.environ.get(LLAMA_SERVER_ENV, "")
        if not binary:
            return None
        server = Path(binary).resolve()
        tree = next((p for p in server.parents if (p / "convert_hf_to_gguf.py").is_file()), None)
        if tree is None:
            raise SystemExit(f"{LLAMA_SERVER_ENV}={binary} is not inside a llama.cpp source tree")
        return cls(server, server.with_name("llama-quantize"), tree / "convert_hf_to_gguf.py")

    def gguf_files(self, scale: Scale) -> tuple[dict[str, Path], dict[str, Any]]:
        """llama.cpp's own bf16 conversion of the checkpoint, quantized to each of GGUF_TYPES."""
        folder = scale.work / "gguf"
        folder.mkdir()
        bf16 = folder / "model-bf16.gguf"
        env = {**scale.env, "PYTHONPATH": str(self.converter.parent / "gguf-py")}
        command = [
            sys.executable,
            str(self.converter),
            str(scale.checkpoint),
            "--outtype",
            "bf16",
            "--outfile",
            str(bf16),
        ]
        converted = watched(command, env)
        facts: dict[str, Any] = {
            "convert_bf16": {"seconds": converted.seconds, "peak_rss_bytes": converted.peak_rss_bytes}
        }
        if not converted.ok:
            facts["convert_bf16"]["failed"] = converted.why_not()
            return {}, facts
        files = {}
        threads = str(len(os.sched_getaffinity(0)))
        for kind in GGUF_TYPES:
            out = folder / f"model-{kind.lower()}.gguf"
            quantized = watched([str(self.quantize), str(bf16), str(out), kind, threads], scale.env)
            facts[f"quantize_{kind}"] = {
                "seconds": quantized.seconds,
                "size_bytes": out.stat().st_size if quantized.ok else 0,
            }
            if quantized.ok:
                files[kind] = out
            else:
                facts[f"quantize_{kind}"]["failed"] = quantized.why_not()
        bf16.unlink()
        return files, facts


def prompt_ids(checkpoint: Path, count: int) -> list[int]:
    """`count` token ids of made-up text, fed as ids to every runtime (one vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text, ids = "", []
    for line in synthetic_corpus(seed=1):
        text += line + " "
        if len(text) > 8 * count:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= count:
                return ids[:count]
    raise RuntimeError(f"the corpus gave {len(ids)} tokens, fewer than {count}")


def bare_prompt_rate(model, ids: list[int]) -> float:
    """Prompt tokens/s of the bare loop: appending `ids` (one pass, which fills the KV cache)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    generator = og.Generator(model, params)
    _, seconds = timed(lambda: generator.append_tokens(np.asarray(ids, dtype=np.int32)))
    return len(ids) / seconds


def llama_prompt_rate(chat_url: str, ids: list[int]) -> float:
    """llama-server's own prompt tokens/s for `ids`, from its timings (no cached prefix)."""
    base = chat_url.removesuffix("/v1/chat/completions")
    body = {"prompt": ids, "n_predict": 1, "cache_prompt": False}
    answer = requests.post(f"{base}/completion", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()["timings"]["prompt_per_second"]


def serving_rates(url: str, max_tokens: int, **fields: Any) -> dict[int, float]:
    """Completion tokens/s of 1 client (4 requests) and of 4 clients together (2 requests each)."""
    generate = served_generate(url, **fields)
    generate(PROMPTS[0], 2)  # warm-up
    return {1: aggregate_rate(generate, 1, 4, max_tokens), 4: aggregate_rate(generate, 4, 2, max_tokens)}


def batch_step_ms(decode_batch: Callable[[int, int], tuple[float, float]], max_tokens: int) -> dict[str, float]:
    """Prompt and decode-step milliseconds of a batch of 1 and of 4 as the served wrapper
    decodes them (`decode_batch(rows, max_tokens)`): what batching can gain."""
    timings = {}
    for rows in (1, 4):
        decode_batch(rows, 4)  # warm-up
        timings[f"batch_{rows}_prompt_ms"], timings[f"batch_{rows}_decode_step_ms"] = decode_batch(rows, max_tokens)
    return timings


def logging_figure(scale: Scale, build: Build, model_name: str) -> Figure:
    """`log_onnx_wrapper`'s own log time over a plain copy of the ONNX folder it logged."""
    import mlflow

    from slmkit.models.onnx_wrapper import wrapper_model_arguments
    from slmkit.models.pipeline import generation_config

    _, copied = timed(lambda: shutil.copytree(build.onnx_dir, scale.work / "copy-onnx"))
    shutil.rmtree(scale.work / "copy-onnx")
    detail = {"log_s": build.log_seconds, "copy_s": copied, "build_s": build.build_seconds}
    figure = Figure("log ONNX wrapper / plain copy", build.log_seconds / copied, detail)
    if not figure.met:
        arguments = wrapper_model_arguments(build.onnx_dir, model_name, generation_config(0, 16))
        with mlflow.start_run(run_name="bench-logging-profile"):
            figure.profile = profile_to(
                scale.profile_stem.with_name(f"{scale.profile_stem.name}-logging.txt"),
                lambda: mlflow.pyfunc.log_model(name="onnx", **arguments),
                libraries=True,
            )
    return figure


@dataclass
class PeerRates:
    """llama-server on each GGUF file: served tok/s by client count, prompt tok/s, bandwidth limits."""

    served: dict[str, dict[int, float]] = field(default_factory=dict)
    prompt: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)


def llama_server_rates(scale: Scale, llama: LlamaCpp | None, gguf: dict[str, Path], ids: list[int], bandwidth: float) -> PeerRates:  # fmt: skip
    peers = PeerRates()
    for kind, file in gguf.items():
        assert llama is not None
        process, url = llama_server(str(llama.server), file, scale.work / f"llama-server-{kind}.log")
        try:
            peers.served[kind] = serving_rates(url, scale.max_tokens, ignore_eos=True)
            peers.prompt[f"llama_server_{kind}"] = llama_prompt_rate(url, ids)
        finally:
            stop_process(process)
        peers.limits[f"gguf_{kind}"] = bandwidth / gguf_bytes_per_token(file)
    return peers


def bandwidth_figure(build: Build, bandwidth: float, peers: PeerRates) -> Figure:
    """The build's bare decode (measured with the builds) against the memory-bandwidth limit."""
    onnx_bytes = onnx_bytes_per_token(build.onnx_dir)
    limits = {"onnx_int4": bandwidth / onnx_bytes, **peers.limits}
    decode = {"onnx_int4_bare": build.bare_decode_tok_s}
    decode.update({f"llama_server_{kind}_1_client": rates[1] for kind, rates in peers.served.items()})
    detail = {"bandwidth_gb_s": bandwidth / 1e9, "weight_bytes_per_token": onnx_bytes, "limit_tok_s": limits,
              "decode_tok_s": decode}  # fmt: skip
    return Figure("decode tok/s / memory-bandwidth limit", build.bare_decode_tok_s / limits["onnx_int4"], detail)


def served_figures(
    scale: Scale, build: Build, llama: LlamaCpp | None, gguf: dict[str, Path], carried: list[Build]
) -> list[Figure]:
    """Ours served (`python -m slmkit.serve`) against llama-server on each GGUF file, at 1 and 4
    clients: the int4 build against the Q4_0 file, and each carry-over (`carried`, served with
    the builds) against its own file; prompt processing of a 1,000-token prompt, and the build's
    bare decode (measured with the builds) against the bandwidth."""
    ids = prompt_ids(scale.checkpoint, PROMPT_TOKENS)
    with served(build.model_dir, scale.env, scale.work / "server.log", front=SLMKIT_SERVE) as server:
        ours = serving_rates(server.chat_url, scale.max_tokens)
    bandwidth = memory_bandwidth(scale.reps)
    bare_model, bare_tokenizer = load(build.onnx_dir)
    pad = model_tokens(build.onnx_dir).pad_id
    peers = llama_server_rates(scale, llama, gguf, ids, bandwidth)
    figures = [bandwidth_figure(build, bandwidth, peers)]
    if not peers.served:
        print(f"llama-server figures skipped: {LLAMA_SERVER_ENV} is not set (bench/README.md: building llama-server)")
        return figures

    def decode_batch(rows: int, max_tokens: int) -> tuple[float, float]:
        return prompt_and_step_ms(bare_model, bare_tokenizer, PROMPTS[:rows], max_tokens, pad)

    peer = "Q4_0" if "Q4_0" in peers.served else next(iter(peers.served))
    detail = {"onnx_int4_tok_s": ours, "llama_server_tok_s": peers.served, "peer": peer,
              "batch_step_ms": batch_step_ms(decode_batch, scale.max_tokens)}  # fmt: skip
    for k in (1, 4):
        name = f"served ONNX / llama-server tok/s, {k} client{'s' * (k > 1)}"
        figure = Figure(name, ours[k] / peers.served[peer][k], detail)
        if not figure.met:
            figure.profile = profile_to(
                scale.profile_stem.with_name(f"{scale.profile_stem.name}-served-{k}.txt"),
                lambda k=k: decode_batch(k, scale.max_tokens),
            )
        figures.append(figure)
    for carry in carried:
        kind = carry.label.removeprefix("gguf-")
        if carry.served_tok_s and kind in peers.served:
            facts = {"onnx_tok_s": carry.served_tok_s, "llama_server_tok_s": peers.served[kind],
                     "bare_decode_tok_s": carry.bare_decode_tok_s}  # fmt: skip
            figures += [Figure(carried_served_figure(kind, k), carry.served_tok_s[k] / peers.served[kind][k], facts)
                        for k in (1, 4)]  # fmt: skip
    prompt = {"bare_int4": bare_prompt_rate(bare_model, ids), **peers.prompt}
    figures.append(
        Figure(
            f"prompt tok/s on {PROMPT_TOKENS:,} tokens: bare int4 / llama-server {peer}",
            prompt["bare_int4"] / prompt[f"llama_server_{peer}"],
            {"prompt_tok_s": prompt},
        )
    )
    return figures


def with_bare_decode(scale: Scale, build: Build, reps: int = 1) -> Build:
    """The build with its bare loop's decode tok/s (two prompts, `reps` repetitions), as every
    build of the table is measured."""
    if build.model_dir is None:
        return build
    model, tokenizer = load(build.onnx_dir)
    rates = decode_rates({"bare": bare_generate(model, tokenizer)}, scale.max_tokens, reps, PROMPTS[:2])
    del model, tokenizer
    release_memory()
    return replace(build, bare_decode_tok_s=rates["bare"])


def with_served_rates(scale: Scale, build: Build) -> Build:
    """The build with its 1- and 4-client rates through `python -m slmkit.serve`'s /v1."""
    if build.model_dir is None:
        return build
    with served(build.model_dir, scale.env, scale.work / f"server-{build.label}.log", front=SLMKIT_SERVE) as server:
        return replace(build, served_tok_s=serving_rates(server.chat_url, scale.max_tokens))


def other_builds(scale: Scale, gguf: dict[str, Path], route_only: bool = False) -> list[Build]:
    """The GGUF carry-over of each of llama.cpp's files, then QUANTIZATIONS, each through the
    steps, measured (bare decode; a carry-over also served) and dropped at once, so disk and
    memory hold one at a time; with `route_only`, the carry-overs alone, not measured."""
    builds = []
    sources = [(f"gguf-{kind}", file, "gguf") for kind, file in gguf.items()]
    others = [] if route_only else [(q, scale.checkpoint, q) for q in QUANTIZATIONS]
    for label, source, quantization in [*sources, *others]:
        build = log_onnx(scale, label, source, quantization)
        build = build if route_only else with_bare_decode(scale, build)
        if quantization == "gguf" and not route_only:
            build = with_served_rates(scale, build)
        if build.model_dir is not None:
            drop(build, download_too=quantization == "gguf")
        print(f"{label}: {build.row()}", flush=True)
        builds.append(build)
    return builds


def gguf_route_figures(int4: Build, builds: list[Build]) -> Iterator[Figure]:
    """Issue 36's figures of each GGUF carry-over among `builds`: `download` and
    `log_onnx_wrapper` together against the int4 step, and the step's peak against 12 GiB."""
    for build in builds:
        if build.label.startswith("gguf-") and build.download is not None:
            kind, route = build.label.removeprefix("gguf-"), build.download.seconds + build.run.seconds
            yield Figure(f"GGUF route {kind}: download + log_onnx_wrapper / int4 step", route / int4.run.seconds,
                         {**build.row(), "int4_step_s": int4.run.seconds})  # fmt: skip
            yield Figure(f"GGUF carry-over {kind}: peak memory / 12 GiB", build.run.peak_rss_bytes / 12 / 2**30,
                         build.row())  # fmt: skip


def phi3_mini_figures(args: argparse.Namespace, work: Path, env: dict[str, str], stamp: str) -> Iterator[Figure]:
    """Every figure of the flagship's scale, yielded as measured so a late failure keeps the rest.

    The builds come first, while this process holds no model: the builder needs most of the
    machine. Then the figures that load models here, each releasing its memory after."""
    import mlflow
    import psutil

    machine_bytes = psutil.virtual_memory().total
    # The steps start in the project folder: their artifacts go to the scratch folder all the same.
    mlflow.create_experiment(EXPERIMENT, artifact_location=(work / "artifacts").as_uri())
    llama = LlamaCpp.from_env()
    for layers in args.layers:  # the largest cut of the model whose int4 build fits in memory
        full = layers == PHI3_MINI_CONFIG["num_hidden_layers"]
        cache = bench_cache() / ("phi3-mini-random" if full else f"phi3-mini-random-{layers}l")
        checkpoint, made = timed(lambda c=cache, n=layers: build_phi3_mini(c, seed=0, layers=n))
        print(f"checkpoint {checkpoint} ({made:.0f} s; {(checkpoint / COMPLETE).read_text()})", flush=True)
        scale = Scale(work, env, stamp, args.reps, args.max_tokens, checkpoint)
        int4 = log_onnx(scale, "int4", checkpoint, "int4")
        if int4.model_dir is not None:
            break
        print(f"int4 build of {layers} layers: {int4.run.why_not()}", flush=True)
        yield Figure(
            f"int4 build of {layers} layers: peak memory / machine memory",
            int4.run.peak_rss_bytes / machine_bytes,
            {"layers": layers, "failed": int4.run.why_not(), "step_seconds": int4.run.seconds},
        )
    else:
        raise SystemExit(f"no cut of the model ({args.layers} layers) built its int4 model within memory")
    gguf, gguf_facts = llama.gguf_files(scale) if llama else ({}, {})
    # int4, the one served and measured against the bandwidth below, with the sitting's repetitions.
    int4 = int4 if args.gguf_route else with_bare_decode(scale, int4, scale.reps)
    builds = [int4, *other_builds(scale, gguf, route_only=args.gguf_route)]
    rows = {build.label: build.row() for build in builds}
    yield Figure(
        "int4 build peak memory / machine memory",
        int4.run.peak_rss_bytes / machine_bytes,
        {"layers": layers, "checkpoint_build_s": made, "builds": rows, "llama_cpp": gguf_facts},
    )
    yield from gguf_route_figures(int4, builds[1:])
    if args.gguf_route:
        return
    for build in builds[1:]:
        if build.label.startswith("gguf-") and build.bare_decode_tok_s:
            ratio = build.bare_decode_tok_s / int4.bare_decode_tok_s
            yield Figure(f"{build.label} carry-over / int4 decode tok/s (bare loop)", ratio, rows[build.label])
    for measure in (
        lambda: [logging_figure(scale, int4, checkpoint.name)],
        lambda: cold_start_figures(int4.model_dir, env, work, scale.reps, scale.profile_stem),
        lambda: wrapper_over_bare(int4.model_dir, scale.max_tokens, scale.reps, PROMPTS[:2], scale.profile_stem),
        lambda: served_figures(scale, int4, llama, gguf, [b for b in builds if b.label.startswith("gguf-")]),
        # Where the Q4_0 carry-over's decode goes against llama-server's: the two kernels alone.
        lambda: q4_0_kernel_figures(llama.server, scale.reps) if llama else [],
    ):
        yield from measure()
        release_memory()
