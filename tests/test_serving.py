"""`python -m slmkit.serve` on both models of the tiny Phi-3, over HTTP on 127.0.0.1.

Both routes, `/invocations` (MLflow's) and `/v1/chat/completions` (OpenAI's), for both models:
bad input gets the same clear 4xx and the server stays up; concurrent clients get their own
answers; streaming; `stop` with the model's source folder gone and the hub unreachable; the
official `openai` client; metrics; body limit; admission control; memory stays flat.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import openai
import psutil
import pytest
import requests
import yaml

from harness.servers import SLMKIT_SERVE, ServedModel, served
from slmkit.chat.adapters import load_chat_model
from tests.conftest import bare_env

# One worker serves both models for the whole module: split, each worker would start both servers.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serving")]

VALID = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4}
ROUTES = ("invocations", "openai")


@dataclass(frozen=True)
class Server:
    """A served model as the tests talk to it, on either route."""

    running: ServedModel
    kind: str

    @property
    def process(self) -> subprocess.Popen:
        return self.running.process

    @property
    def log(self) -> Path:
        return self.running.log

    def post(self, body: object, route: str = "invocations", **kwargs) -> requests.Response:
        data = body if isinstance(body, (str, bytes, Iterator)) else json.dumps(body)
        url = self.running.url if route == "invocations" else self.running.chat_url
        return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=120, **kwargs)

    def answer(self, body: dict, route: str) -> dict:
        """The ChatCompletion of a request that must succeed, whichever route answered it."""
        response = self.post(body, route)
        assert response.status_code == 200, response.text[:500]
        answer = response.json()
        if route == "invocations":  # MLflow's llm/v1/chat answer: a one-element list (mlflow#14429)
            assert isinstance(answer, list)
            assert len(answer) == 1
            return answer[0]
        assert answer["object"] == "chat.completion"
        return answer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.running.base}/v1", api_key="unused", max_retries=0)

    def metrics(self) -> str:
        return requests.get(f"{self.running.base}/metrics", timeout=10).text

    def wait_until_idle(self, timeout_s: float = 30) -> None:
        """Until /metrics shows no chat request in flight, the count admission control refuses by
        (503): a check that needs the only slot free waits for it instead of a fixed pause."""
        deadline = time.monotonic() + timeout_s
        while metric_value(self.metrics(), "slmkit_requests_in_flight") > 0:
            assert time.monotonic() < deadline, f"a request still held the server after {timeout_s} s"
            time.sleep(0.1)

    def resident_bytes(self) -> int:
        """Resident memory of the server and its workers together."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def metric_value(text: str, name: str) -> float:
    """One sample of a /metrics text, by its exact name and labels; 0 where it is absent."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def serve(
    model: Path | str,
    log: Path,
    *extra: str,
    kind: str = "onnx",
    front: str = SLMKIT_SERVE,
) -> Iterator[Server]:
    """Serve a local model folder with a bare environment, from a scratch folder."""
    with served(model, bare_env(log.parent), log, *extra, front=front) as running:
        yield Server(running, kind)


@pytest.fixture(scope="module", params=["onnx", "pipeline"])
def server(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = request.getfixturevalue("wrapper_dir" if request.param == "onnx" else "pipeline_dir")
    log = tmp_path_factory.mktemp(f"serve-{request.param}") / "server.log"
    yield from serve(model, log, kind=request.param)


LONG = "The capital of France is Paris. " * 200
BAD_INPUT = [
    ("{not json", 400, "valid JSON", "not valid JSON"),
    ({"max_tokens": 4}, 400, "exactly one of the input fields", "messages is required"),  # MLflow's own check on /invocations
    ({"messages": []}, 400, "messages must be a non-empty list", None),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role must be one of", None),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content must be a string, got int", None),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content must be a string", None),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content is empty", None),
    ({**VALID, "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0", None),
    ({**VALID, "max_tokens": -3}, 400, "max_tokens must be at least 1, got -3", None),
    ({**VALID, "max_tokens": "ten"}, 400, "max_tokens must be an integer, got 'ten'", None),
    ({**VALID, "max_tokens": 10**9}, 400, "max_tokens must be at most the model's context", None),
    ({**VALID, "temperature": -0.5}, 400, "temperature must be >= 0", None),
    ({**VALID, "top_p": 0}, 400, "top_p must be in (0, 1]", None),
    ({**VALID, "top_p": 1.5}, 400, "top_p must be in (0, 1]", None),
    ({**VALID, "stop": "\n"}, 400, "stop must be a list of non-empty strings", None),
    ({**VALID, "stop": [1, 2]}, 400, "stop must be a list of non-empty strings", None),
    ({**VALID, "n": 3}, 400, "n=3 is not supported", None),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "past the model's context of 512 tokens", None),
    ({"messages": [{"role": "user", "content": "x" * 600_000}]}, 400, "characters, past the model's context", None),
    ({"messages": [{"role": "user", "content": "x" * 2_000_000}]}, 413, "larger than 1000000 bytes", None),
    ({"messages": [{"role": "user", "content": "bell\x07here"}]}, 400, "messages[0].content contains the control character U+0007", None),
    ({**VALID, "temperature": 0}, 200, "chat.completion", None),
    ({"messages": [{"role": "user", "content": "Привет 👋 你好 — ça va? \t tab"}], "max_tokens": 4}, 200, "chat.completion", None),
]  # fmt: skip
BAD_INPUT_IDS = [
    "malformed-json", "missing-messages", "empty-messages", "unknown-role", "non-string-content", "null-content",
    "empty-content", "max-tokens-zero", "max-tokens-negative", "max-tokens-string", "max-tokens-huge",
    "negative-temperature", "top-p-zero", "top-p-above-one", "stop-string", "stop-not-strings", "n-above-one",
    "past-context", "600kb-payload", "2mb-body", "control-character", "temperature-zero", "unicode",
]  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("body", "status", "names", "openai_names"), BAD_INPUT, ids=BAD_INPUT_IDS)
def test_bad_input_gets_the_same_clear_4xx_from_both_models_and_the_server_stays_up(
    server: Server, route: str, body, status: int, names: str, openai_names: str | None
):
    answer = server.post(body, route)
    assert answer.status_code == status, answer.text[:500]
    expected = openai_names if route == "openai" and openai_names else names
    assert expected in answer.text
    assert "stack_trace" not in answer.text
    assert "Traceback" not in answer.text
    assert len(answer.content) < 2000  # no body echoed back
    if route == "openai" and status >= 400:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        field = re.match(r"[a-z_]+(\[\d+\]\.[a-z]+)?", expected).group(0)
        if field.split("[")[0] in ("messages", "max_tokens", "temperature", "top_p", "stop", "n"):
            assert error["param"] == field  # OpenAI's `param`: the official client exposes it
    assert server.answer(VALID, route)["choices"][0]["message"]["content"] == "Paris."
    assert server.process.poll() is None


OVERSIZED_MB = (2, 8, 32)


def oversized_body(megabytes: int) -> bytes:
    filler = b"x" * (megabytes * 1_000_000)
    return b'{"messages": [{"role": "user", "content": "' + filler + b'"}]}'


def post_oversized(server: Server, route: str, body: bytes, close: bool, chunked: bool) -> tuple[int, bytes]:
    """POST `body` with http.client, which sends the whole body before it reads the answer, as
    urllib and most clients do: either with Content-Length in one write, or chunked in slow
    pieces. `close` sends `Connection: close`."""
    path = "/invocations" if route == "invocations" else "/v1/chat/completions"
    connection = http.client.HTTPConnection(server.running.base.removeprefix("http://"), timeout=60)
    headers = {"Content-Type": "application/json", **({"Connection": "close"} if close else {})}

    def slow_pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            time.sleep(0.002)
            yield body[start : start + (1 << 20)]

    try:
        connection.request(
            "POST", path, body=slow_pieces() if chunked else body, headers=headers, encode_chunked=chunked
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("route", ROUTES)
def test_oversized_bodies_get_413_in_the_routes_error_shape_however_they_are_sent(server: Server, route: str):
    """2, 8 and 32 MB, with and without `Connection: close`, announced or chunked: never a reset."""
    for megabytes in OVERSIZED_MB:
        body = oversized_body(megabytes)
        for close in (True, False):
            for chunked in (False, True):
                case = f"{megabytes} MB, close={close}, chunked={chunked}"
                status, answer = post_oversized(server, route, body, close, chunked)
                assert status == 413, (case, answer[:300])
                error = json.loads(answer)
                if route == "openai":
                    assert error["error"]["code"] == "request_too_large", case
                    assert error["error"]["type"] == "invalid_request_error", case
                    assert "larger than 1000000 bytes" in error["error"]["message"], case
                else:  # MLflow's shape
                    assert "error_code" in error, case
                    assert "larger than 1000000 bytes" in error["message"], case
                started = time.monotonic()
                assert server.answer(VALID, route)["choices"][0]["message"]["content"] == "Paris.", case
                assert time.monotonic() - started < 10, case


def test_the_official_client_gets_a_status_error_413_for_an_oversized_body(server: Server):
    client = server.client()
    for megabytes in (3, 8):
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model="tiny-phi3", messages=[{"role": "user", "content": "x" * megabytes * 1_000_000}], max_tokens=4
            )
        assert refused.value.status_code == 413
        assert "larger than 1000000 bytes" in refused.value.message


def test_openai_client_calls_the_model_with_and_without_streaming(server: Server):
    client = server.client()
    [model] = client.models.list().data
    assert model.id == "tiny-phi3"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == "Paris."
    assert whole.usage.completion_tokens >= 2
    chunks = list(
        client.chat.completions.create(
            model=model.id, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model.id, messages=messages, max_tokens=0)
    assert refused.value.param == "max_tokens"
    assert "max_tokens must be at least 1" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_stop_cuts_the_answer_on_both_routes_with_the_hub_unreachable(server: Server):
    """The pipeline model's source folder is gone (see the fixture) and HF_HUB_OFFLINE is set."""
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}
    for route in ROUTES:
        answer = server.answer({**question, "stop": ["is"]}, route)
        assert answer["choices"][0]["message"]["content"] == "Par"
        assert answer["choices"][0]["finish_reason"] == "stop"
    stream = server.client().chat.completions.create(model="tiny-phi3", stream=True, stop=["is"], **question)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Par"


@pytest.mark.parametrize("model_dir", ["wrapper_dir", "pipeline_dir"])
def test_stop_works_in_process_without_the_source_folder_or_the_hub(model_dir: str, request, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = request.getfixturevalue(model_dir)
    recorded = yaml.safe_load((folder / "MLmodel").read_text())["flavors"].get("transformers", {})
    assert recorded.get("source_model_name", "tiny-phi3") == "tiny-phi3"  # a name, not a folder of this machine
    chat = load_chat_model(str(folder))
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}
    answer = chat.complete({**question, "stop": ["is"]})
    assert answer["choices"][0]["message"]["content"] == "Par"
    assert answer["model"] == "tiny-phi3"
    assert answer["usage"]["completion_tokens"] < 8  # generation ended at the stop string, not at max_tokens


def answer_of(server: Server, prompt: str, route: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
    return server.answer(body, route)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("route", ROUTES)
def test_concurrent_clients_get_the_answer_each_prompt_gets_alone(server: Server, route: str):
    prompts = [f"Client {c} asks question {q}: what is {c} times {q}?" for c in range(4) for q in range(4)]
    alone = {prompt: answer_of(server, prompt, route) for prompt in prompts}
    with ThreadPoolExecutor(max_workers=4) as clients:
        together = dict(zip(prompts, clients.map(lambda p: answer_of(server, p, route), prompts), strict=True))
    assert together == alone
    assert len(set(alone.values())) > 1  # distinct prompts, so crossed answers would show


def test_requests_sent_together_share_one_batch_from_the_first(server: Server):
    """The first of four requests sent at once waits, up to the batch window, for the others the
    server has accepted, instead of decoding alone while they queue behind it (which ran them as
    a batch of 1 and then one of 3). The transformers flavor answers one request per call: four
    batches of one row.

    A request counts once the server has read it, and on a loaded machine (the suite's other
    workers) the four can reach it further apart than the first's decode start: one burst in a
    full `make test` ran as 1 + 3. So up to three bursts are sent, and one of them must run as a
    single batch; without the wait, each burst runs as 1 + 3 unless all four are read first."""
    prompts = [f"Client {c} asks: what is {c} plus {c}?" for c in range(4)]

    def burst() -> tuple[float, float]:
        server.wait_until_idle()
        together = threading.Barrier(len(prompts))

        def ask(prompt: str) -> str:
            together.wait()
            return answer_of(server, prompt, "openai")

        before = server.metrics()
        with ThreadPoolExecutor(max_workers=len(prompts)) as clients:
            assert all(clients.map(ask, prompts))
        after = server.metrics()
        return tuple(metric_value(after, name) - metric_value(before, name)
                     for name in ("slmkit_batch_size_count", "slmkit_batch_size_sum"))  # fmt: skip

    expected = (1, 4) if server.kind == "onnx" else (4, 4)
    seen = []
    for _ in range(3):
        seen.append(burst())
        if seen[-1] == expected:
            break
    assert seen[-1] == expected, f"batches and rows of each burst: {seen}"
    assert all(rows == 4 for _, rows in seen)


@pytest.mark.parametrize("server", ["onnx"], indirect=True)  # the pipeline model records no traces
def test_every_served_request_is_traced_once_in_the_tracking_store(server: Server):
    """Each request leaves one trace, its span in the store, and no second copy. With MLflow's 10
    trace writers a trace's record often landed before its span, and MLflow then also wrote the
    whole trace as an artifact file: 71 of 355 traces in a run of this module."""
    client = mlflow.MlflowClient(f"sqlite:///{server.log.parent / 'mlflow.db'}")  # the server's ./mlflow.db

    def traces_since(started_ms: int) -> list:
        """The store's traces of requests that arrived from `started_ms` on: the earlier tests'
        may still be being written."""
        traces = client.search_traces(locations=["0"], max_results=1000, include_spans=False)
        return [trace for trace in traces if trace.info.request_time >= started_ms]

    started_ms = int(time.time() * 1000)
    with ThreadPoolExecutor(max_workers=4) as clients:
        list(clients.map(lambda i: answer_of(server, f"Trace {i}: what is {i} squared?", "openai"), range(8)))
    deadline = time.monotonic() + 30
    while len(new := traces_since(started_ms)) < 8:  # the server writes them in the background
        assert time.monotonic() < deadline, f"{len(new)} of 8 traces written after 30 s"
        time.sleep(0.2)
    assert len(new) == 8
    for found in new:
        trace = client.get_trace(found.info.trace_id)
        assert [span.name for span in trace.data.spans] == ["chat"]
        assert trace.info.tags["mlflow.trace.spansLocation"] == "TRACKING_STORE"
    assert list((server.log.parent / "mlruns").rglob("traces.json")) == []


def test_traces_still_queued_when_the_server_stops_are_written(wrapper_dir: Path, tmp_path: Path):
    """Stopped (SIGTERM) straight after its answers, the server writes the traces its one trace
    writer still holds before it exits: none is lost."""
    with served(wrapper_dir, bare_env(tmp_path), tmp_path / "server.log", front=SLMKIT_SERVE) as running:
        server = Server(running, "onnx")
        with ThreadPoolExecutor(max_workers=4) as clients:
            asked = [f"Request {i}: say {i}." for i in range(24)]
            assert all(clients.map(lambda prompt: answer_of(server, prompt, "openai"), asked))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the server ran in tmp_path
    assert len(client.search_traces(locations=["0"], max_results=1000, include_spans=False)) == 24


def test_metrics_count_requests_tokens_latency_and_batches(server: Server):
    before = server.metrics()
    server.answer(VALID, "openai")
    list(server.client().chat.completions.create(model="tiny-phi3", stream=True, **VALID))
    server.post({"messages": []}, "openai")
    after = server.metrics()

    assert metric_value(after, 'slmkit_requests_total{route="/v1/chat/completions",status="200"}') >= 2 + metric_value(
        before, 'slmkit_requests_total{route="/v1/chat/completions",status="200"}'
    )
    assert metric_value(after, 'slmkit_requests_total{route="/v1/chat/completions",status="400"}') >= 1
    assert (
        metric_value(after, "slmkit_completion_tokens_total")
        >= metric_value(before, "slmkit_completion_tokens_total") + 4
    )
    assert metric_value(after, "slmkit_prompt_tokens_total") > metric_value(before, "slmkit_prompt_tokens_total")
    assert metric_value(after, "slmkit_time_to_first_token_seconds_count") >= 1
    assert metric_value(after, 'slmkit_request_seconds_count{route="/v1/chat/completions"}') >= 3
    assert metric_value(after, "slmkit_batch_size_count") >= 2
    assert metric_value(after, "slmkit_requests_in_flight") == 0


def test_serve_refuses_a_model_it_cannot_fetch_in_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "slmkit.serve", "-m", "models:/no-such-model@champion"],
        env={**bare_env(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: cannot fetch the model models:/no-such-model@champion")
    )
    assert "Traceback" not in result.stderr


def test_memory_stays_flat_over_200_requests(server: Server):
    prompts = [f"Request {i}: tell me about the number {i}." for i in range(200)]
    for prompt in prompts[:20]:
        answer_of(server, prompt, "openai")
    after_20 = server.resident_bytes()
    for prompt in prompts[20:]:
        answer_of(server, prompt, "openai")
    after_200 = server.resident_bytes()
    assert after_200 <= after_20 * 1.10, (after_20, after_200)
