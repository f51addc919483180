"""Logged models keep working across slmkit's layouts, and carry every line of code they import.

`tests/data/flat-layout-onnx-wrapper.tar.gz` is a tiny ONNX chat wrapper saved by slmkit's flat
layout (commit e2e3065, before the subpackages), with the answer it gave then beside it. It carries
its own `slmkit` (`code_paths`), whose module names this layout no longer has; it is kept packed,
as a model is shipped, so that its copy of the old code is not read as part of this tree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import openai
import pytest
import requests

from harness.servers import SLMKIT_SERVE, served
from slmkit import PROJECT_ROOT
from slmkit.chat.adapters import load_chat_model
from tests.conftest import bare_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flat_layout_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flat-layout")
    with tarfile.open(DATA / "flat-layout-onnx-wrapper.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    return folder / "flat-layout-onnx-wrapper"


DATA = PROJECT_ROOT / "tests" / "data"
RECORDED = json.loads((DATA / "flat-layout-onnx-wrapper.answer.json").read_text())

# Run in a fresh interpreter from a folder outside the project, with `-P` (no script folder on
# sys.path) and no PYTHONPATH: only what the model carries can provide `slmkit`.
LOAD_AND_ANSWER = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict(json.loads(sys.argv[2]))[0]
import slmkit
print(json.dumps({"slmkit": slmkit.__file__, "sys_path": sys.path, "choice": answer["choices"][0],
                  "usage": answer["usage"]}))
"""


def answer_in_fresh_process(model: Path, request: dict, home: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-P", "-c", LOAD_AND_ANSWER, str(model), json.dumps(request)],
        cwd=home, env=bare_env(home), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["flat", "current"])
def test_a_logged_wrapper_answers_in_a_fresh_process_from_the_code_it_carries(
    layout, flat_layout_model, wrapper_dir, tmp_path
):
    model = flat_layout_model if layout == "flat" else wrapper_dir
    request = RECORDED["request"]
    answered = answer_in_fresh_process(model, request, tmp_path)
    assert Path(answered["slmkit"]).is_relative_to(model / "code" / "slmkit")
    assert not any(Path(entry or ".").resolve() == PROJECT_ROOT for entry in answered["sys_path"])
    if layout == "flat":
        expected = {"content": RECORDED["content"], "finish_reason": RECORDED["finish_reason"]}
        assert answered["usage"] == RECORDED["usage"]
    else:
        choice = load_chat_model(str(wrapper_dir), traced=False).complete(request)["choices"][0]
        expected = {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"]}
    assert answered["choice"]["message"]["content"] == expected["content"]
    assert answered["choice"]["finish_reason"] == expected["finish_reason"]


def test_a_model_logged_by_the_flat_layout_serves_on_both_routes_as_it_answered_then(flat_layout_model, tmp_path):
    """`python -m slmkit.serve` imports this layout's slmkit before it loads the model: the model
    must still import its own (`slmkit.chat.adapters.load_pyfunc`)."""
    with served(flat_layout_model, bare_env(tmp_path), tmp_path / "server.log", front=SLMKIT_SERVE) as server:
        invoked = requests.post(server.url, json=RECORDED["request"], timeout=60)
        assert invoked.status_code == 200, invoked.text
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused")
        completion = client.chat.completions.create(model="tiny-phi3", **RECORDED["request"])
    assert invoked.json()[0]["choices"][0]["message"]["content"] == RECORDED["content"]
    assert completion.choices[0].message.content == RECORDED["content"]
    assert completion.usage.completion_tokens == RECORDED["usage"]["completion_tokens"]
