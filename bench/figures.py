"""Small measuring tools shared by the benchmark figures: timers, rates, profiles, a server."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

# Open-ended prompts, so both models write the full token budget and decode dominates.
PROMPTS = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Explain how a bicycle works to a ten-year-old."}],
    [{"role": "user", "content": "Describe a walk through a forest in autumn."}],
    [{"role": "user", "content": "Give advice to someone starting to learn the piano."}],
    [{"role": "user", "content": "Tell me about the history of bread."}],
]


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
