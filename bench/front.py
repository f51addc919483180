"""The serving front (`python -m slmkit.serve`) against in-process use and `mlflow models serve`.

Figure 11: time to the first streamed token over HTTP (SSE on `/v1/chat/completions`) over the
time to the first chunk of `predict_stream` in process, on the same model, alternating.
Figure 12: completion tokens/s at 1 and 4 clients through the front's OpenAI route over
`mlflow models serve`'s `/invocations`, on the same model, one server after the other.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import requests

from bench.figures import PROMPTS, Figure, aggregate_rate, served_generate
from harness.servers import MLFLOW_SERVE, SLMKIT_SERVE, served


def first_chunk_s(chunks: Any) -> float:
    """Seconds until an iterator of chat chunks yields one with content."""
    started = time.perf_counter()
    for chunk in chunks:
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            return time.perf_counter() - started
    raise AssertionError("the stream ended without content")


def http_first_token_s(chat_url: str, request: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to the first SSE line with content."""
    import json

    started = time.perf_counter()
    with requests.post(chat_url, json={**request, "stream": True}, stream=True, timeout=300) as answer:
        for line in answer.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[len(b"data: ") :])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - started
    raise AssertionError("the stream ended without content")


def front_figures(
    model_dir: Path, wrapper: Any, env: dict[str, str], work: Path, max_tokens: int, reps: int
) -> list[Figure]:
    """Figures 11 and 12 on the ONNX wrapper in `model_dir` (loaded in process as `wrapper`)."""
    request = {"messages": PROMPTS[0], "max_tokens": max_tokens}
    rates: dict[str, dict[int, float]] = {}
    with served(model_dir, env, work / "front.log", front=SLMKIT_SERVE) as server:
        http_first_token_s(server.chat_url, request)  # warm-up
        first_chunk_s(wrapper.predict_stream(request))
        over_http, in_process = [], []
        for _ in range(reps * 2):
            over_http.append(http_first_token_s(server.chat_url, request))
            in_process.append(first_chunk_s(wrapper.predict_stream(request)))
        rates[SLMKIT_SERVE] = {k: aggregate_rate(served_generate(server.chat_url), k, 8, max_tokens) for k in (1, 4)}
    with served(model_dir, env, work / "mlflow-serve.log", front=MLFLOW_SERVE) as server:
        rates[MLFLOW_SERVE] = {k: aggregate_rate(served_generate(server.url), k, 8, max_tokens) for k in (1, 4)}
    ttft_http, ttft_local = statistics.median(over_http), statistics.median(in_process)
    figures = [
        Figure("streamed first token over HTTP / in process", ttft_http / ttft_local, {"http_s": ttft_http, "in_process_s": ttft_local}),
    ]  # fmt: skip
    for k in (1, 4):
        ratio = rates[SLMKIT_SERVE][k] / rates[MLFLOW_SERVE][k]
        figures.append(
            Figure(f"front /v1 / mlflow models serve tok/s, {k} client{'s' * (k > 1)}", ratio,
                   {"front_tok_s": rates[SLMKIT_SERVE], "mlflow_serve_tok_s": rates[MLFLOW_SERVE]})
        )  # fmt: skip
    return figures
