"""`make bench`: every figure is a ratio measured side by side in this one run, on this machine.

Runs the pipeline on a model (default `smollm2-135m`, offline) into a scratch tracking store,
then measures the logged models against their floors: a bare onnxruntime-genai loop, in-process
predict, a plain file copy, the machine's memory bandwidth. Prints a table with each target
marked met or not met and writes bench/results/<date>-<host>.json; a missed target gets a
pyinstrument profile beside the JSON, named in it. Nothing here asserts a time.

`--scale phi3-mini` measures the same figures at the flagship's size instead, on a checkpoint of
Phi-3-mini's shape with random weights, against llama.cpp (bench/scale.py), into
bench/results/<date>-<host>-phi3-mini.json; with `--gguf-route`, only the int4 build and the GGUF
route (`download` and the carry-over of llama-quantize's files, issue 36's figures), into
…-phi3-mini-gguf-route.json. `--kernels` measures only the Q4_0 matrix products of a Phi-3-mini
token on onnxruntime's kernel and on llama.cpp's (bench/kernels.py; needs LLAMA_SERVER; about a
minute), into …-kernels.json; the phi3-mini scale measures them too.

    python -m bench [--model smollm2-135m] [--reps 5] [--max-tokens 64]
    python -m bench --scale phi3-mini [--layers 32,24] [--reps 2] [--max-tokens 32] [--gguf-route]
    python -m bench --kernels [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.batch import batch_figures
from bench.batching import engine_batch, prompt_and_step_ms, static_batch
from bench.fidelity import fidelity_figures, node_figures
from bench.figures import (
    PROMPTS,
    RESULTS,
    Figure,
    Sitting,
    aggregate_rate,
    bare_generate,
    cold_start_figures,
    decode_rates,
    median_time,
    memory_bandwidth,
    profile_to,
    relative,
    served_generate,
    timed,
    wrapper_generate,
    wrapper_over_bare,
)
from bench.front import front_figures
from bench.kernels import q4_0_kernel_figures
from bench.quality import LLAMA_SERVER_ENV, llama_server, peer_figures, quantization_figures
from bench.scale import LlamaCpp, phi3_mini_figures
from harness.servers import BIN, SLMKIT_SERVE, served, stop_process
from slmkit import PROJECT_ROOT
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT, wrapper_model_arguments
from slmkit.models.pipeline import build_pipeline, generation_config, pipeline_model_arguments
from slmkit.onnx.batching import MAX_BATCH_SIZE_ENV
from slmkit.onnx.build import build_onnx
from slmkit.onnx.greedy import bare_greedy, load
from slmkit.onnx.session import THREADS_ENV, model_tokens
from slmkit.sources.eval_set import load_eval_set
from slmkit.workflow.steps import STEP_TAG


def mlflow_run(env: dict[str, str], model: str, *params: str) -> float:
    """Seconds for one `mlflow run .` of the whole pipeline."""
    command = [str(BIN / "mlflow"), "run", str(PROJECT_ROOT), "--env-manager", "local", "--experiment-name", "bench"]
    command += ["-P", f"model={model}", "-P", "max_rows=4", "-P", "max_tokens=16", *params]
    _, seconds = timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))
    return seconds


def batching_alternatives(folder: Path, max_tokens: int, reps: int) -> dict[str, float | bool]:
    """Batch-of-4 and batch-of-1 tokens/s for static Generator batches and for the Engine, with
    whether batching kept every answer equal to the prompt answered alone, and the prompt and
    decode-step times of a batch of 1 and of 4 that bound what batching can gain
    (bench/batching.py)."""
    model, tokenizer = load(folder)
    prompts = PROMPTS[:4]
    alone = [bare_greedy(model, tokenizer, messages, max_tokens)[0] for messages in prompts]
    pad = model_tokens(folder).pad_id
    methods: dict[str, Callable[[int], tuple[float, bool]]] = {
        f"static_{side}_padded": lambda k, side=side: static_batch(
            model, tokenizer, prompts[:k], alone[:k], max_tokens, pad, side
        )
        for side in ("right", "left")
    }
    methods["engine"] = lambda k: engine_batch(model, tokenizer, prompts[:k], alone[:k], max_tokens)
    figures: dict[str, float | bool] = {}
    for name, run in methods.items():
        run(4)  # warm-up
        rates = {k: statistics.median(run(k)[0] for _ in range(reps)) for k in (1, 4)}
        figures[f"{name}_1_tok_s"], figures[f"{name}_4_tok_s"] = rates[1], rates[4]
        figures[f"{name}_equal_to_alone"] = run(4)[1]
    for k in (1, 4):
        timings = [prompt_and_step_ms(model, tokenizer, prompts[:k], max_tokens, pad) for _ in range(reps)]
        figures[f"batch_{k}_prompt_ms"] = statistics.median(prompt for prompt, _ in timings)
        figures[f"batch_{k}_decode_step_ms"] = statistics.median(step for _, step in timings)
    return figures


def gguf_of(download_run_id: str, work: Path) -> Path | None:
    """The GGUF file the download run kept of its source, or None for other sources."""
    import mlflow

    from slmkit.manifest import MANIFEST_NAME, read_manifest
    from slmkit.workflow.lineage import GGUF_ARTIFACT, download_gguf

    manifest = mlflow.artifacts.download_artifacts(
        run_id=download_run_id, artifact_path=MANIFEST_NAME, dst_path=str(work)
    )
    return download_gguf(download_run_id, read_manifest(Path(manifest)), work / GGUF_ARTIFACT)


def greedy_outputs(folder: Path, max_tokens: int) -> list[list[int]]:
    model, tokenizer = load(folder)
    return [bare_greedy(model, tokenizer, messages, max_tokens)[0] for messages in PROMPTS]


@dataclass(frozen=True)
class Bench(Sitting):
    """What every figure measures on: the sitting, and the models `main` logged."""

    pipeline_uri: str
    onnx_model_dir: Path
    checkpoint: Path
    gguf: Path | None  # a GGUF source's file, whose weights the checkpoint does not hold
    download_run_id: str
    model_name: str
    model_license: str

    @property
    def onnx_dir(self) -> Path:
        return self.onnx_model_dir / "artifacts" / ONNX_ARTIFACT


def cached_rerun(env: dict[str, str], model: str, reps: int, stamp: str) -> Figure:
    """7. A scheduled rerun with every step cached, over the cold run that logs the models."""
    cold = mlflow_run(env, model)
    cached = statistics.median(mlflow_run(env, model) for _ in range(reps))
    figure = Figure("pipeline: cached rerun / cold run", cached / cold, {"cold_s": cold, "cached_s": cached})
    if not figure.met:
        # The cached path without the outer `mlflow run` process: main finding every step cached.
        report = RESULTS / f"{stamp}-cached-rerun.txt"
        command = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(report), "-m", "steps.main"]
        command += ["--model", model, "--max-rows", "4", "--max-tokens", "16"]
        profiled = subprocess.run(
            command, env={**env, "MLFLOW_EXPERIMENT_NAME": "bench"}, cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        if profiled.returncode == 0:
            figure.profile = relative(report)
        else:  # the figure is kept; the reason goes with it
            figure.detail["profile_error"] = (profiled.stderr.strip().splitlines() or ["no output"])[-1]
    return figure


def bench_of_main_run(work: Path, env: dict[str, str], stamp: str, args: argparse.Namespace) -> Bench:
    """The models and checkpoint of the newest `main` run in the scratch store, by its own run
    ids (not by a registry alias, which a failed gate would not have moved)."""
    import mlflow

    from slmkit.workflow.cache import handed_on

    [main_run] = mlflow.search_runs(
        experiment_names=["bench"], filter_string=f"tags.`{STEP_TAG}` = 'main'", output_format="list", max_results=1
    )
    params = main_run.data.params
    onnx_uri = handed_on("log_onnx_wrapper", params["log_onnx_wrapper_run_id"])
    download_run_id = params["download_run_id"]
    return Bench(
        work=work,
        env=env,
        stamp=stamp,
        reps=args.reps,
        max_tokens=args.max_tokens,
        pipeline_uri=handed_on("log_pipeline", params["log_pipeline_run_id"]),
        onnx_model_dir=Path(mlflow.artifacts.download_artifacts(onnx_uri, dst_path=str(work / "onnx-model"))),
        checkpoint=Path(
            mlflow.artifacts.download_artifacts(run_id=download_run_id, artifact_path="checkpoint", dst_path=str(work))
        ),
        gguf=gguf_of(download_run_id, work),
        download_run_id=download_run_id,
        model_name=mlflow.get_run(download_run_id).data.params["model_name"],
        model_license=mlflow.get_run(download_run_id).data.params.get("license", ""),
    )


def wrapper_overhead(bench: Bench) -> list[Figure]:
    """1. The logged wrapper in process over a bare loop on the same folder (bench/figures.py)."""
    return wrapper_over_bare(bench.onnx_model_dir, bench.max_tokens, bench.reps, PROMPTS, RESULTS / bench.stamp)


def cold_start_figure(bench: Bench) -> list[Figure]:
    """6. Load to first token, wrapper over bare, each in fresh processes (bench/figures.py)."""
    return cold_start_figures(bench.onnx_model_dir, bench.env, bench.work, bench.reps, RESULTS / bench.stamp)


def serving(bench: Bench) -> list[Figure]:
    """2 and 5. Serving overhead and concurrency, on one served ONNX model with the default
    settings (one worker using every CPU, concurrent greedy requests batched up to 4 rows). The
    detail of figure 5 holds what else was tried: the same server with batching off, one worker
    per CPU with one thread each, and the in-process batching alternatives."""
    import mlflow

    wrapper = mlflow.pyfunc.load_model(str(bench.onnx_model_dir))
    model_dir, env, work, max_tokens = bench.onnx_model_dir, bench.env, bench.work, bench.max_tokens
    request = {"messages": PROMPTS[0], "max_tokens": max_tokens}
    in_process = median_time(lambda: wrapper.predict(request), bench.reps)
    with served(model_dir, env, work / "server.log", front=SLMKIT_SERVE) as server:
        url = server.chat_url
        over_http = median_time(lambda: requests.post(url, json=request, timeout=300).raise_for_status(), bench.reps)
        one = aggregate_rate(served_generate(url), 1, 8, max_tokens)
        four = aggregate_rate(served_generate(url), 4, 8, max_tokens)
    unbatched_env = {**env, MAX_BATCH_SIZE_ENV: "1"}
    with served(model_dir, unbatched_env, work / "server-unbatched.log", front=SLMKIT_SERVE) as server:
        one_unbatched = aggregate_rate(served_generate(server.chat_url), 1, 8, max_tokens)
        four_unbatched = aggregate_rate(served_generate(server.chat_url), 4, 8, max_tokens)
    cpus = len(os.sched_getaffinity(0))
    per_cpu_env = {**env, THREADS_ENV: "1"}
    with served(model_dir, per_cpu_env, work / "server-workers.log", "-w", str(cpus), front=SLMKIT_SERVE) as server:
        aggregate_rate(served_generate(server.chat_url), cpus, 1, max_tokens)  # every worker loads its model
        one_per_cpu = aggregate_rate(served_generate(server.chat_url), 1, 8, max_tokens)
        four_per_cpu = aggregate_rate(served_generate(server.chat_url), 4, 8, max_tokens)
    latency = Figure(
        "serving latency / in-process", over_http / in_process, {"http_s": over_http, "in_process_s": in_process}
    )
    concurrency = Figure(
        "4 clients / 1 client aggregate tok/s",
        four / one,
        {
            "one_client_tok_s": one,
            "four_clients_tok_s": four,
            "unbatched_one_client_tok_s": one_unbatched,
            "unbatched_four_clients_tok_s": four_unbatched,
            f"{cpus}_workers_x_1_thread_one_client_tok_s": one_per_cpu,
            f"{cpus}_workers_x_1_thread_four_clients_tok_s": four_per_cpu,
            **batching_alternatives(bench.onnx_dir, max_tokens, bench.reps),
        },
    )
    if not concurrency.met:
        # One batch of four as the wrapper runs it, in this thread so the profile sees it: the
        # split between prompt processing (append_tokens) and decode steps (generate_next_token).
        model, tokenizer = load(bench.onnx_dir)
        pad = model_tokens(bench.onnx_dir).pad_id
        concurrency.profile = profile_to(
            RESULTS / f"{bench.stamp}-concurrency.txt",
            lambda: prompt_and_step_ms(model, tokenizer, PROMPTS[:4], max_tokens, pad),
        )
    return [latency, concurrency]


def onnx_over_pipeline(bench: Bench) -> list[Figure]:
    """3. ONNX int4 over the transformers pipeline, both loaded as logged."""
    import mlflow

    rates = decode_rates(
        {
            "pipeline": wrapper_generate(mlflow.pyfunc.load_model(bench.pipeline_uri)),
            "onnx": wrapper_generate(mlflow.pyfunc.load_model(str(bench.onnx_model_dir))),
        },
        bench.max_tokens,
        bench.reps,
        PROMPTS[:1],  # the pipeline decodes ~6x slower: one prompt, every repetition
    )
    detail = {"onnx_tok_s": rates["onnx"], "pipeline_tok_s": rates["pipeline"]}
    return [Figure("ONNX / pipeline decode tok/s", rates["onnx"] / rates["pipeline"], detail)]


def memory_wall(bench: Bench) -> list[Figure]:
    """4. Decode against the memory-bandwidth limit, and the builder and session options that move it."""
    max_tokens, reps = bench.max_tokens, bench.reps
    bandwidth = memory_bandwidth(reps)
    weight_bytes = sum(p.stat().st_size for p in bench.onnx_dir.iterdir() if p.name.startswith("model.onnx"))
    limit = bandwidth / weight_bytes
    model, tokenizer = load(bench.onnx_dir)
    default_rate = decode_rates({"default": bare_generate(model, tokenizer)}, max_tokens, reps)["default"]
    reference = greedy_outputs(bench.onnx_dir, max_tokens)
    # Each builder variant's greedy outputs are compared with the default build's.
    builder_variants = {"accuracy_level=4": {"accuracy_level": "4"}, "block_size=128": {"block_size": "128"}}
    variants = {}
    for index, (name, options) in enumerate(builder_variants.items()):
        scratch = bench.work / f"variant-{index}"
        build_onnx("int4", bench.checkpoint, scratch / "onnx", scratch, "cpu", bench.gguf, options)
        model, tokenizer = load(scratch / "onnx")
        outputs = greedy_outputs(scratch / "onnx", max_tokens)
        variants[name] = {
            "decode_tok_s": decode_rates({name: bare_generate(model, tokenizer)}, max_tokens, reps)[name],
            "parity_exact_match": statistics.fmean(a == b for a, b in zip(reference, outputs, strict=True)),
        }
    for threads in (1, 2):
        model, tokenizer = load(bench.onnx_dir, threads)
        name = f"intra_op_threads={threads}"
        variants[name] = {"decode_tok_s": decode_rates({name: bare_generate(model, tokenizer)}, max_tokens, reps)[name]}
    detail = {
        "bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "limit_tok_s": limit,
        "default_tok_s": default_rate,
        "variants": variants,
    }
    return [Figure("decode tok/s / memory-bandwidth limit", default_rate / limit, detail)]


def quality_and_peer(bench: Bench) -> list[Figure]:
    """9 and 10. Quality against speed of every build of this checkpoint, and the llama.cpp peer
    on the same GGUF file (bench/quality.py)."""
    rows = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl")
    gguf, work, max_tokens = bench.gguf, bench.work, bench.max_tokens
    figures = quantization_figures(bench.checkpoint, gguf, rows, work / "quantizations", max_tokens, bench.reps)
    with served(bench.onnx_model_dir, bench.env, work / "server-peer.log", front=SLMKIT_SERVE) as server:
        figures += peer_figures(server.chat_url, gguf, rows, work, max_tokens)
    return figures


def fidelity_beside_llama_cpp(bench: Bench) -> list[Figure]:
    """14. Where the carried model's divergence comes from, node by node, and its fidelity beside
    llama-server's on the same positions and the same GGUF file (bench/fidelity.py)."""
    gguf = bench.gguf
    if gguf is None:
        print("fidelity figures skipped: the source is not a GGUF file")
        return []
    figures = node_figures(bench.checkpoint, gguf)
    binary = os.environ.get(LLAMA_SERVER_ENV, "")
    if not binary:
        print(f"llama-server fidelity skipped: {LLAMA_SERVER_ENV} is not set (bench/README.md: building llama-server)")
        return figures + fidelity_figures(bench.checkpoint, gguf, bench.onnx_dir, None)
    process, chat_url = llama_server(binary, gguf, bench.work / "llama-server-fidelity.log")
    try:
        return figures + fidelity_figures(
            bench.checkpoint, gguf, bench.onnx_dir, chat_url.removesuffix("/v1/chat/completions")
        )
    finally:
        stop_process(process)


def serving_front(bench: Bench) -> list[Figure]:
    """11 and 12. Streamed first token over HTTP, and tok/s against `mlflow models serve` (bench/front.py)."""
    import mlflow

    wrapper = mlflow.pyfunc.load_model(str(bench.onnx_model_dir))
    return front_figures(bench.onnx_model_dir, wrapper, bench.env, bench.work, bench.max_tokens, bench.reps)


def batch_inference(bench: Bench) -> list[Figure]:
    """13. batch_infer on Spark: partitions, and batched against row-at-a-time predict (bench/batch.py)."""
    return batch_figures(str(bench.onnx_model_dir), bench.work, rows=96, max_tokens=bench.max_tokens)


def logging_cost(bench: Bench) -> list[Figure]:
    """8. Logging each model as its step logs it, over writing the same files without MLflow: a
    copy of the ONNX folder, the pipeline's own `save_pretrained` (a GGUF source's checkpoint holds
    no weights to copy)."""
    import mlflow

    generation = generation_config(0, 16)
    pipeline = build_pipeline(bench.checkpoint, "auto", bench.model_name, bench.gguf)
    log = {
        "ONNX wrapper": lambda: log_onnx_as_the_step_does(bench, generation),
        "pipeline": lambda: mlflow.transformers.log_model(
            name="pipeline", **pipeline_model_arguments(pipeline, generation, bench.model_license)
        ),
    }
    copy = {
        "ONNX wrapper": lambda: shutil.copytree(bench.onnx_dir, bench.work / "copy-onnx", dirs_exist_ok=True),
        "pipeline": lambda: pipeline.save_pretrained(bench.work / "copy-checkpoint"),
    }
    figures = []
    for name in log:
        with mlflow.start_run(run_name=f"bench-logging-{name}"):
            _, logged = timed(log[name])
        _, copied = timed(copy[name])
        figure = Figure(f"log {name} / plain copy", logged / copied, {"log_s": logged, "copy_s": copied})
        if not figure.met:
            with mlflow.start_run(run_name=f"bench-logging-profile-{name}"):
                figure.profile = profile_to(RESULTS / f"{bench.stamp}-logging-{name.split()[0].lower()}.txt", log[name])
        figures.append(figure)
    return figures


def log_onnx_as_the_step_does(bench: Bench, generation: dict) -> None:
    import mlflow

    mlflow.pyfunc.log_model(name="onnx", **wrapper_model_arguments(bench.onnx_dir, bench.model_name, generation))


# The figures after the cold and cached pipeline runs, in the order they are measured.
FIGURES: tuple[Callable[[Bench], list[Figure]], ...] = (
    wrapper_overhead,
    cold_start_figure,
    serving,
    onnx_over_pipeline,
    memory_wall,
    quality_and_peer,
    fidelity_beside_llama_cpp,
    serving_front,
    batch_inference,
    logging_cost,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scale",
        choices=("small", "phi3-mini"),
        default="small",
        help="small: the pipeline on --model; phi3-mini: a Phi-3-mini-shaped random checkpoint (bench/scale.py)",
    )
    parser.add_argument("--model", default="smollm2-135m", help="--scale small only")
    parser.add_argument(
        "--layers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[32, 24],
        help="--scale phi3-mini only: layer counts to try, largest first, until one's int4 build fits in memory",
    )
    parser.add_argument(
        "--gguf-route",
        action="store_true",
        help="--scale phi3-mini only: the int4 build and the GGUF route (download + carry-over) alone",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="only the Q4_0 products of a Phi-3-mini token, onnxruntime's kernel against llama.cpp's (bench/kernels.py)",
    )
    parser.add_argument("--reps", type=int, help="default: 5 (small), 2 (phi3-mini), 3 (--kernels)")
    parser.add_argument("--max-tokens", type=int, help="default: 64 (small), 32 (phi3-mini)")
    args = parser.parse_args()
    small = args.scale == "small"
    args.reps = args.reps or (3 if args.kernels else 5 if small else 2)
    args.max_tokens = args.max_tokens or (64 if small else 32)
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-") as scratch:  # removed on every exit
        run(args, Path(scratch))


def run(args: argparse.Namespace, work: Path) -> None:
    stamp = f"{datetime.date.today().isoformat()}-{platform.node() or 'host'}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "SLMKIT_LOCK_DIR": str(work / "locks"),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    os.environ.update({key: env[key] for key in env if key != "PATH"})
    os.chdir(work)  # `./mlruns` of the scratch store lands here
    if args.kernels:
        figures = list_as_measured(kernels_alone(args), args, f"{stamp}-kernels")
    elif args.scale == "phi3-mini":
        name = f"{stamp}-phi3-mini{'-gguf-route' if args.gguf_route else ''}"
        figures = list_as_measured(phi3_mini_figures(args, work, env, stamp), args, name)
    else:
        figures = list_as_measured(small_figures(args, work, env, stamp), args, stamp)
    print("| figure | value | target | verdict |\n|---|---:|---|---|")
    for figure in figures:
        print(figure.row())


def kernels_alone(args: argparse.Namespace) -> Iterator[Figure]:
    """`--kernels`: the Q4_0 products on both kernels, with no model built."""
    llama = LlamaCpp.from_env()
    if llama is None:
        raise SystemExit(f"--kernels needs {LLAMA_SERVER_ENV}: the llama-server that bench/build_llama_cpp.sh builds")
    yield from q4_0_kernel_figures(llama.server, args.reps)


def small_figures(args: argparse.Namespace, work: Path, env: dict[str, str], stamp: str) -> Iterator[Figure]:
    """The cold and cached pipeline runs, then every figure of FIGURES on the models they logged."""
    yield cached_rerun(env, args.model, args.reps, stamp)
    bench = bench_of_main_run(work, env, stamp, args)
    for measure in FIGURES:
        yield from measure(bench)


def list_as_measured(measured: Iterator[Figure], args: argparse.Namespace, name: str) -> list[Figure]:
    """Every figure `measured` yields, the results file rewritten after each."""
    figures = []
    for figure in measured:
        figures.append(figure)
        print(figure.row(), flush=True)
        write_results(figures, args, name)
    return figures


def write_results(figures: list[Figure], args: argparse.Namespace, name: str) -> None:
    """bench/results/<name>.json, with what was measured on which machine and how."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "host": platform.node(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.processor() or 'unknown CPU'}",
        "scale": args.scale,
        "model": args.model if args.scale == "small" else "phi3-mini-random",
        "reps": args.reps,
        "max_tokens": args.max_tokens,
        "command": "python -m bench --kernels"
        if args.kernels
        else "make bench"
        if args.scale == "small"
        else "python -m bench --scale phi3-mini" + (" --gguf-route" if args.gguf_route else ""),
        "figures": [figure.as_dict() for figure in figures],
    }
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}", flush=True)


if __name__ == "__main__":
    main()
