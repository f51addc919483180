"""Small measuring tools shared by the benchmark figures: timers, rates, profiles, a server."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

BIN = Path(sys.executable).parent

# Open-ended prompts, so both models write the full token budget and decode dominates.
PROMPTS = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Explain how a bicycle works to a ten-year-old."}],
    [{"role": "user", "content": "Describe a walk through a forest in autumn."}],
    [{"role": "user", "content": "Give advice to someone starting to learn the piano."}],
    [{"role": "user", "content": "Tell me about the history of bread."}],
]


@dataclass
class Figure:
    """One benchmark figure: a ratio, its target, and where the time goes when it is missed."""

    name: str
    value: float
    target: str
    met: bool | None
    detail: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None

    def row(self) -> str:
        verdict = "-" if self.met is None else ("met" if self.met else "NOT MET")
        return f"| {self.name} | {self.value:.3f} | {self.target} | {verdict} |"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def chat_completion(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One greedy chat request to `/invocations` (a one-element list back, mlflow#14429) or to
    an OpenAI route (the object itself)."""
    answer = requests.post(url, json={"messages": messages, "max_tokens": max_tokens, "temperature": 0}, timeout=300)
    answer.raise_for_status()
    body = answer.json()
    return body[0] if isinstance(body, list) else body


def served_generate(url: str) -> Generate:
    return lambda messages, max_tokens: chat_completion(url, messages, max_tokens)["usage"]["completion_tokens"]


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


def profile_to(path: Path, fn: Callable[[], Any]) -> str:
    """Run `fn` under pyinstrument, write its text report to `path`, return the path as named
    in the result file (relative to the project)."""
    from pyinstrument import Profiler

    profiler = Profiler()
    profiler.start()
    try:
        fn()
    finally:
        profiler.stop()
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    return relative(path)


def relative(path: Path) -> str:
    from slmkit import PROJECT_ROOT

    return path.relative_to(PROJECT_ROOT).as_posix()


@dataclass(frozen=True)
class ServedModel:
    """A running `mlflow models serve` process."""

    url: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early, naming the exit code, if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Terminate, and kill if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def served(
    model: Path | str, env: dict[str, str], log: Path, *extra: str, timeout_s: float = 180
) -> Iterator[ServedModel]:
    """`mlflow models serve` on a free port of 127.0.0.1, run from the log's folder (so traces
    and caches land there), stopped on exit; `extra` are more serve flags such as `-t 1`."""
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "-p", str(port), *extra]
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=log.parent)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", process, timeout_s)
            yield ServedModel(f"http://127.0.0.1:{port}/invocations", process, log)
        finally:
            stop_process(process)
