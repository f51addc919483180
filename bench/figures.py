"""Measuring tools shared by the benchmark figures: timers, rates, cold starts, peak memory,
profiles, and the figures both scales measure the same way (wrapper against bare loop, cold start)."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import requests

from slmkit import PROJECT_ROOT
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT
from slmkit.onnx.batching import PROMPT_CACHE_ENV
from slmkit.onnx.greedy import bare_greedy, load

RESULTS = PROJECT_ROOT / "bench" / "results"

# Open-ended prompts, so both models write the full token budget and decode dominates.
PROMPTS = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Explain how a bicycle works to a ten-year-old."}],
    [{"role": "user", "content": "Describe a walk through a forest in autumn."}],
    [{"role": "user", "content": "Give advice to someone starting to learn the piano."}],
    [{"role": "user", "content": "Tell me about the history of bread."}],
]


@dataclass(frozen=True)
class Sitting:
    """What every figure of one bench run shares: its scratch folder, the environment that points
    at its scratch store, the stamp its results are named by, and its settings."""

    work: Path
    env: dict[str, str]
    stamp: str
    reps: int
    max_tokens: int


@dataclass(frozen=True)
class Target:
    """A bound a figure must meet: `value <op> bound`."""

    op: str
    bound: float
    note: str = ""

    def met(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}" + (f" ({self.note})" if self.note else "")


# The llama-quantize types of the GGUF files the scale bench carries over.
GGUF_TYPES = ("Q4_0", "Q4_1")


def carried_served_figure(kind: str, clients: int) -> str:
    """The name of the figure of a GGUF carry-over served against llama-server on the same file."""
    return f"served GGUF carry-over {kind} / llama-server {kind} tok/s, {clients} client{'s' * (clients > 1)}"


# Every target, declared once, by figure name; a figure not named here is reported, not judged.
TARGETS = {
    "pipeline: cached rerun / cold run": Target("<=", 0.05),
    "wrapper decode tok/s / bare loop (tracing off)": Target(">=", 0.98),
    "cold start: wrapper / bare": Target("<=", 1.2),
    "serving latency / in-process": Target("<=", 1.10),
    "4 clients / 1 client aggregate tok/s": Target(">=", 1.6),
    "log ONNX wrapper / plain copy": Target("<=", 1.5),
    "log pipeline / plain copy": Target("<=", 1.5),
    "gguf correct rate - source's": Target(">=", -0.05),
    "gguf exact match with the source": Target(">=", 0.6, "goal 0.9"),
    "gguf / int4 decode tok/s": Target(">=", 0.9),
    "served ONNX / llama-server tok/s, 1 client": Target(">=", 1.0),
    "served ONNX / llama-server tok/s, 4 clients": Target(">=", 1.0),
    "streamed first token over HTTP / in process": Target("<=", 1.2),
    "front /v1 / mlflow models serve tok/s, 1 client": Target(">=", 0.95),
    "front /v1 / mlflow models serve tok/s, 4 clients": Target(">=", 0.95),
    "fidelity top-1: ONNX - llama-server": Target(">=", -0.005),
    "multi-turn first token, last turn: ONNX / llama-server": Target("<=", 1.0),
    "two conversations taking turns, last turns' first token: ONNX / llama-server": Target("<=", 1.0),
    "fidelity KLD: ONNX / llama-server": Target("<=", 1.1),
    # Issue 36, at Phi-3-mini's size (bench/scale.py), for each of llama-quantize's files.
    **{f"GGUF route {kind}: download + log_onnx_wrapper / int4 step": Target("<=", 2.0) for kind in GGUF_TYPES},
    **{f"GGUF carry-over {kind}: peak memory / 12 GiB": Target("<=", 1.0) for kind in GGUF_TYPES},
    # Issue 33, at Phi-3-mini's size: the carry-over of each file served against llama-server on it.
    **{carried_served_figure(kind, clients): Target(">=", 1.0) for kind in GGUF_TYPES for clients in (1, 4)},
}


@dataclass
class Figure:
    """One benchmark figure: a ratio, judged against its target in TARGETS, and where the time
    goes when it is missed (`profile`)."""

    name: str
    value: float
    detail: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None

    @property
    def target(self) -> str:
        return str(TARGETS[self.name]) if self.name in TARGETS else "report"

    @property
    def met(self) -> bool | None:
        return TARGETS[self.name].met(self.value) if self.name in TARGETS else None

    def row(self) -> str:
        verdict = "-" if self.met is None else ("met" if self.met else "NOT MET")
        return f"| {self.name} | {self.value:.3f} | {self.target} | {verdict} |"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target": self.target, "met": self.met}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def median_time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn)[1] for _ in range(reps))


Generate = Callable[[list[dict[str, str]], int], int]


def decode_rates(
    generators: dict[str, Generate], max_tokens: int, reps: int, prompts: list = PROMPTS
) -> dict[str, float]:
    """Median decode tokens/s of each generator: (n - 1) tokens over the full time minus the
    1-token time, measured the same way for all.

    `generate(messages, max_tokens)` returns the number of completion tokens. The generators
    take turns prompt by prompt, in rotating order, so drift in the machine's speed and the
    after-effects of the previous call hit them alike.
    """
    for generate in generators.values():
        generate(prompts[0], 4)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in generators}
    names = list(generators)
    for rep in range(reps):
        for index, messages in enumerate(prompts):
            # Rotate who goes first: onnxruntime's pool threads spin a while after a call, which
            # slows whatever runs right after in the same process.
            shift = (rep * len(prompts) + index) % len(names)
            for name in names[shift:] + names[:shift]:
                generate = generators[name]
                _, first = timed(lambda m=messages, g=generate: g(m, 1))
                tokens, total = timed(lambda m=messages, g=generate: g(m, max_tokens))
                if tokens > 1 and total > first:
                    rates[name].append((tokens - 1) / (total - first))
    return {name: statistics.median(values) for name, values in rates.items()}


def chat_completion(url: str, messages: list[dict[str, str]], max_tokens: int, **fields: Any) -> dict[str, Any]:
    """One greedy chat request to `/invocations` (a one-element list back, mlflow#14429) or to
    an OpenAI route (the object itself); `fields` are more request fields, such as llama-server's
    `ignore_eos`."""
    request = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **fields}
    answer = requests.post(url, json=request, timeout=600)
    answer.raise_for_status()
    body = answer.json()
    return body[0] if isinstance(body, list) else body


def served_generate(url: str, **fields: Any) -> Generate:
    return lambda messages, max_tokens: chat_completion(url, messages, max_tokens, **fields)["usage"][
        "completion_tokens"
    ]


def wrapper_generate(model) -> Generate:
    return lambda messages, k: model.predict({"messages": messages, "max_tokens": k})[0]["usage"]["completion_tokens"]


def bare_generate(model, tokenizer) -> Generate:
    return lambda messages, k: len(bare_greedy(model, tokenizer, messages, k)[0])


def aggregate_rate(generate: Generate, clients: int, requests_each: int, max_tokens: int) -> float:
    """Completion tokens/s of all clients together, each sending `requests_each` requests."""
    counts = [0] * clients

    def client(index: int) -> None:
        for r in range(requests_each):
            counts[index] += generate(PROMPTS[(index + r) % len(PROMPTS)], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def profile_to(path: Path, fn: Callable[[], Any], libraries: bool = False) -> str:
    """Run `fn` under pyinstrument, write its text report to `path`, return the path as named
    in the result file (relative to the project). `libraries` shows MLflow's and the other
    libraries' own frames, which pyinstrument hides, for a cost that lies inside a library call."""
    from pyinstrument import Profiler

    profiler = Profiler()
    profiler.start()
    try:
        fn()
    finally:
        profiler.stop()
    options = {"show_regex": ".*"} if libraries else None  # pyinstrument still drops frames under 1%
    path.write_text(profiler.output_text(unicode=False, color=False, processor_options=options))
    return relative(path)


def relative(path: Path) -> str:
    return path.relative_to(PROJECT_ROOT).as_posix()


def memory_bandwidth(reps: int) -> float:
    """Bytes/s of large numpy reductions, one per core at once: the memory read bandwidth.

    numpy releases the GIL in reductions, so the threads read in parallel as the model's
    matmuls do; one thread alone stays below the bandwidth on most machines.
    """
    cores = os.cpu_count() or 1
    chunks = [np.ones(64 * 2**20 // cores, dtype=np.float64) for _ in range(cores)]  # 512 MiB in all

    def read_all() -> None:
        threads = [threading.Thread(target=chunk.sum) for chunk in chunks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return sum(chunk.nbytes for chunk in chunks) / median_time(read_all, reps)


def onnx_bytes_per_token(folder: Path) -> int:
    """Bytes of weights one decode step reads in an ONNX model: every initializer but those only
    a Gather reads (the embedding table, of which a step reads one row)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes = {
        t.name: ExternalDataInfo(t).length if uses_external_data(t) else len(t.raw_data)
        for t in model.graph.initializer
    }
    read_whole = {name for node in model.graph.node if not node.op_type.startswith("Gather") for name in node.input}
    return sum(size for name, size in sizes.items() if name in read_whole)


def gguf_bytes_per_token(file: Path) -> int:
    """The same for a GGUF file: every tensor but the token embedding, unless the output layer is
    tied to it (no `output.weight`)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(file)).tensors}
    gathered = {"token_embd.weight"} if "output.weight" in tensors else set()
    return sum(size for name, size in tensors.items() if name not in gathered)


# A command stops once the machine has less than this available: measured, never swapped or OOM-killed.
MEMORY_RESERVE_BYTES = 3 * 2**29
# How long a step stopped for memory has to end its run FAILED before it is killed.
STOP_GRACE_S = 60


@dataclass(frozen=True)
class Watched:
    """What one command took: wall seconds, the peak resident memory of its process tree (sampled
    every 0.1 s, so a shorter spike can pass unseen), and whether it was stopped for memory."""

    seconds: float
    peak_rss_bytes: int
    returncode: int
    out_of_memory: bool
    output_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.out_of_memory

    def why_not(self) -> str:
        if self.out_of_memory:
            gib, reserve = self.peak_rss_bytes / 2**30, MEMORY_RESERVE_BYTES / 2**30
            return f"stopped for memory at {gib:.1f} GiB resident, with under {reserve:g} GiB of the machine left"
        if self.returncode == -9:
            return f"killed (SIGKILL, the kernel's out-of-memory killer?) at {self.peak_rss_bytes / 2**30:.1f} GiB"
        return (
            f"exit {self.returncode}: {self.output_tail.strip().splitlines()[-1] if self.output_tail.strip() else ''}"
        )


def tree_resident_bytes(root) -> int:
    """Resident bytes of a process and all its descendants, each shared page counted once: the
    sum of their proportional set sizes (PSS). A sum of RSS counts a page every process maps
    once per process, and a 2026-12-02 run put a 24 GiB machine's builds at 43 GiB that way."""
    import psutil

    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += process.memory_full_info().pss
    return total


def stop_for_memory(root) -> None:
    """Kill the children of `root` at once (the builder, which holds the memory) and send `root`,
    the step, SIGTERM, which it handles like an error: its run ends FAILED instead of being left
    RUNNING in the store, and its temporary folders go. Any of them may have exited meanwhile."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        root.terminate()


def watched(command: list[str], env: dict[str, str], cwd: Path | None = None) -> Watched:
    """Run `command`, sampling its process tree's resident memory; stop it (and say so) when the
    machine runs short, so a build too large for it reports its peak instead of being OOM-killed."""
    import psutil

    started = time.perf_counter()
    peak, out_of_memory = 0, False
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                peak = max(peak, tree_resident_bytes(root))
            except psutil.Error:  # the root itself exited meanwhile
                break
            if psutil.virtual_memory().available < MEMORY_RESERVE_BYTES:
                out_of_memory = True
                stop_for_memory(root)
                break
            time.sleep(0.1)
        try:
            returncode = process.wait(timeout=STOP_GRACE_S if out_of_memory else None)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        output.seek(0)
        tail = output.read()[-4000:].decode(errors="replace")
    return Watched(time.perf_counter() - started, peak, returncode, out_of_memory, tail)


def cold_start(script: str, folder: Path, env: dict[str, str], reps: int) -> tuple[float, int]:
    """Median seconds from load to first token, each in a fresh process (imports not counted),
    and the largest peak resident memory of those processes (their own VmHWM: `ru_maxrss` would
    also count the forking bench process, whose pages the child held until its exec)."""
    times, peaks = [], []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", script, str(folder)], env=env, check=True, capture_output=True, text=True
        )
        seconds, peak_kib = out.stdout.strip().splitlines()[-1].split()
        times.append(float(seconds))
        peaks.append(int(peak_kib) * 1024)
    return statistics.median(times), max(peaks)


# Each prints its seconds and its peak resident KiB since its exec (VmHWM, Linux).
PEAK_KIB = "PEAK_KIB = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))"
BARE_COLD = f"""
import sys, time, json
import onnxruntime_genai as og
{PEAK_KIB}
start = time.perf_counter()
model = og.Model(sys.argv[1]); tok = og.Tokenizer(model)
ids = tok.encode(tok.apply_chat_template(json.dumps([{{"role": "user", "content": "Hi"}}]), add_generation_prompt=True))
params = og.GeneratorParams(model); params.set_search_options(max_length=len(ids) + 1, do_sample=False)
gen = og.Generator(model, params); gen.append_tokens(ids); gen.generate_next_token()
print(time.perf_counter() - start, PEAK_KIB())
"""
WRAPPER_COLD = f"""
import sys, time
import mlflow
{PEAK_KIB}
start = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict({{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 1}})
print(time.perf_counter() - start, PEAK_KIB())
"""
# The same without MLflow's two costs: its check of the model's requirements against every
# installed distribution (`suppress_warnings`) and the tracing store its first span opens.
WRAPPER_COLD_WITHOUT_MLFLOW_CHECKS = WRAPPER_COLD.replace(
    "load_model(sys.argv[1])", 'load_model(sys.argv[1], suppress_warnings=True, model_config={"tracing": "false"})'
)


def cold_start_figures(model_dir: Path, env: dict[str, str], work: Path, reps: int, profile_stem: Path) -> list[Figure]:
    """Load to first token of the logged wrapper over the bare loop on its ONNX folder, each in
    fresh processes, and of the wrapper without MLflow's requirement check and tracing (ours
    alone); a miss gets a pyinstrument profile of the wrapper's cold start."""
    bare_cold, bare_peak = cold_start(BARE_COLD, model_dir / "artifacts" / ONNX_ARTIFACT, env, reps)
    wrapper_cold, wrapper_peak = cold_start(WRAPPER_COLD, model_dir, env, reps)
    ours, _ = cold_start(WRAPPER_COLD_WITHOUT_MLFLOW_CHECKS, model_dir, env, reps)
    detail = {
        "wrapper_s": wrapper_cold,
        "bare_s": bare_cold,
        "wrapper_without_requirement_check_and_tracing_s": ours,
        "wrapper_peak_rss_bytes": wrapper_peak,
        "bare_peak_rss_bytes": bare_peak,
    }
    figure = Figure("cold start: wrapper / bare", wrapper_cold / bare_cold, detail)
    without = Figure(
        "cold start without MLflow's requirement check and tracing: wrapper / bare", ours / bare_cold, detail
    )
    if not figure.met:
        # In a fresh process, as measured: the lazy imports load_model triggers are part of it.
        script, report = work / "cold_start.py", profile_stem.with_name(f"{profile_stem.name}-cold-start.txt")
        script.write_text(WRAPPER_COLD)
        profiler = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(report), str(script)]
        subprocess.run([*profiler, str(model_dir)], env=env, check=True, capture_output=True)
        figure.profile = relative(report)
    return [figure, without]


def wrapper_over_bare(model_dir: Path, max_tokens: int, reps: int, prompts: list, profile_stem: Path) -> list[Figure]:
    """The logged wrapper in process over a bare loop on the same folder, with tracing off, so it
    is the wrapper's own cost, and what per-request tracing adds to it; a miss gets a profile."""
    import mlflow

    # The bare loop prefills every prompt afresh; so does the wrapper here (the prompts repeat,
    # and its prompt cache would otherwise skip them). The decoder reads the switch at load.
    with mock.patch.dict(os.environ, {PROMPT_CACHE_ENV: "0"}):
        traced = mlflow.pyfunc.load_model(str(model_dir))
        untraced = mlflow.pyfunc.load_model(str(model_dir), model_config={"tracing": "false"})
    bare_model, bare_tokenizer = load(model_dir / "artifacts" / ONNX_ARTIFACT)
    generators = {
        "bare": bare_generate(bare_model, bare_tokenizer),
        "untraced": wrapper_generate(untraced),
        "traced": wrapper_generate(traced),
    }
    rates = decode_rates(generators, max_tokens, reps, prompts)
    overhead = Figure(
        "wrapper decode tok/s / bare loop (tracing off)",
        rates["untraced"] / rates["bare"],
        {"wrapper_tok_s": rates["untraced"], "bare_tok_s": rates["bare"]},
    )
    if not overhead.met:
        overhead.profile = profile_to(
            profile_stem.with_name(f"{profile_stem.name}-wrapper.txt"),
            lambda: [wrapper_generate(untraced)(m, max_tokens) for m in prompts],
        )
    tracing = Figure(
        "wrapper decode tok/s: tracing on / off",
        rates["traced"] / rates["untraced"],
        {"traced_tok_s": rates["traced"], "untraced_tok_s": rates["untraced"]},
    )
    return [overhead, tracing]
