"""`mlflow models serve` on the ONNX chat wrapper: bad input gets a clear 4xx and the server stays
up; concurrent clients get their own answers; memory stays flat."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from bench.figures import ServedModel, served
from tests.conftest import BIN

pytestmark = pytest.mark.integration

VALID = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4}


@dataclass(frozen=True)
class Server:
    """A served model as the tests talk to it."""

    running: ServedModel

    @property
    def process(self) -> subprocess.Popen:
        return self.running.process

    @property
    def log(self) -> Path:
        return self.running.log

    def post(self, body: object, **kwargs) -> requests.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(
            self.running.url, data=data, headers={"Content-Type": "application/json"}, timeout=120, **kwargs
        )

    def resident_bytes(self) -> int:
        """Resident memory of the server and its workers together."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def serve(model: Path, log: Path, *extra: str) -> Iterator[Server]:
    """Serve a local model folder with a bare environment, from a scratch folder."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(log.parent)}
    with served(model, env, log, *extra) as running:
        yield Server(running)


@pytest.fixture(scope="module")
def server(wrapper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(wrapper_dir, tmp_path_factory.mktemp("serve") / "server.log")


LONG = "The capital of France is Paris. " * 200


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ("{not json", 400, "valid JSON"),
        ({"max_tokens": 4}, 400, "exactly one of the input fields"),  # MLflow's own check: no chat key at all
        ({"messages": []}, 400, "messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "key `content`. Expected type string"),
        ({"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content is empty"),
        ({**VALID, "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0"),
        ({**VALID, "max_tokens": -3}, 400, "max_tokens must be at least 1, got -3"),
        ({**VALID, "max_tokens": "ten"}, 400, "max_tokens must be an integer, got 'ten'"),
        ({**VALID, "max_tokens": 10**9}, 400, "max_tokens must be at most the model's context"),
        ({**VALID, "temperature": -0.5}, 400, "temperature must be >= 0"),
        ({**VALID, "top_p": 0}, 400, "top_p must be in (0, 1]"),
        ({**VALID, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
        ({**VALID, "stop": "\n"}, 400, "stop must be a list of non-empty strings"),
        ({**VALID, "stop": [1, 2]}, 400, "stop must be a list of non-empty strings"),
        ({**VALID, "n": 3}, 400, "n=3 is not supported"),
        ({"messages": [{"role": "user", "content": LONG}]}, 400, "past the model's context of 512 tokens"),
        ({"messages": [{"role": "user", "content": "x" * 8_000_000}]}, 400, "characters, past the model's context"),
        ({"messages": [{"role": "user", "content": "bell\x07here"}]}, 400, "messages[0].content contains the control character U+0007"),
        ({"messages": [{"role": "user", "content": "Привет 👋 你好 — ça va? \t tab"}], "max_tokens": 4}, 200, "chat.completion"),
    ],
    ids=[
        "malformed-json", "missing-messages", "empty-messages", "unknown-role", "non-string-content", "empty-content",
        "max-tokens-zero", "max-tokens-negative", "max-tokens-string", "max-tokens-huge", "negative-temperature",
        "top-p-zero", "top-p-above-one", "stop-string", "stop-not-strings", "n-above-one", "past-context",
        "8mb-payload", "control-character", "unicode",
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_up(server: Server, body, status: int, names: str):
    answer = server.post(body)
    assert answer.status_code == status, answer.text[:500]
    assert names in answer.text
    assert "stack_trace" not in answer.text
    assert "Traceback" not in answer.text
    follow_up = server.post(VALID)
    assert follow_up.status_code == 200
    assert follow_up.json()[0]["choices"][0]["message"]["content"] == "Paris."
    assert server.process.poll() is None


def answer_of(server: Server, prompt: str) -> str:
    response = server.post({"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text[:300]
    return response.json()[0]["choices"][0]["message"]["content"]


def test_concurrent_clients_get_the_answer_each_prompt_gets_alone(server: Server):
    prompts = [f"Client {c} asks question {q}: what is {c} times {q}?" for c in range(8) for q in range(10)]
    alone = {prompt: answer_of(server, prompt) for prompt in prompts}
    with ThreadPoolExecutor(max_workers=8) as clients:
        together = dict(zip(prompts, clients.map(lambda p: answer_of(server, p), prompts), strict=True))
    assert together == alone
    assert len(set(alone.values())) > 1  # distinct prompts, so crossed answers would show


def test_memory_stays_flat_over_200_requests(server: Server):
    prompts = [f"Request {i}: tell me about the number {i}." for i in range(200)]
    for prompt in prompts[:20]:
        answer_of(server, prompt)
    after_20 = server.resident_bytes()
    for prompt in prompts[20:]:
        answer_of(server, prompt)
    after_200 = server.resident_bytes()
    assert after_200 <= after_20 * 1.10, (after_20, after_200)
