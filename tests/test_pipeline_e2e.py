"""`mlflow run .` end to end on a tiny Phi-3, against a real tracking server.

One session-scoped run of `main` feeds most tests; each test reads what a user would read:
runs, params, metrics, artifacts, and the logged models loaded back by URI.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException

from harness.servers import MLFLOW_SERVE, SLMKIT_SERVE, free_port, served, wait_for_http
from slmkit import PROJECT_ROOT
from slmkit.environment import read_pins
from slmkit.manifest import file_sha256, read_manifest, verify_folder
from slmkit.onnx.greedy import bare_greedy, load
from slmkit.onnx.session import model_tokens
from slmkit.sources.eval_set import load_eval_set
from slmkit.workflow.steps import DOWNLOAD_RUN_TAG, ORDER, SOURCE_KEY_TAG
from tests.conftest import ONE_THREAD_ENV, PipelineRun, TrackingServer, mlflow_run, runs_of

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6}


def test_main_runs_four_finished_children_in_order(pipeline_run: PipelineRun):
    assert pipeline_run.parent.info.status == "FINISHED"
    assert list(pipeline_run.children) == list(ORDER)
    children = [pipeline_run.children[step] for step in ORDER]
    assert all(run.info.status == "FINISHED" for run in children)
    for earlier, later in itertools.pairwise(children):
        assert earlier.info.end_time <= later.info.start_time
    recorded = {step: pipeline_run.parent.data.params[f"{step}_run_id"] for step in ORDER}
    assert recorded == {step: run.info.run_id for step, run in pipeline_run.children.items()}


def test_main_leaves_nothing_in_the_temporary_folder(pipeline_run: PipelineRun, main_temporary: Path):
    """Downloads of checkpoints and models (evaluate fetches each model it measures) go to
    folders the steps remove: at Phi-3's size each would leave GBs behind in /tmp."""
    assert pipeline_run.parent.info.status == "FINISHED"
    # What may stay: MLflow's `Model.load` of a model URI keeps the MLmodel file (a few KB) it
    # fetched in a folder of its own, and onnxruntime writes a 51-byte session id (.ses).
    left = {p.name for p in main_temporary.rglob("*") if p.is_file()}
    assert left <= {"MLmodel", ".ses"}, left


def test_summary_names_runs_models_and_metrics(pipeline_run: PipelineRun):
    for step, run in pipeline_run.children.items():
        assert f"{step:<17} run {run.info.run_id}" in pipeline_run.output
    assert pipeline_run.model_uri("log_onnx_wrapper") in pipeline_run.output
    assert "answer_correct_rate" in pipeline_run.output
    assert "-m slmkit.serve -m models:/e2e-onnx@champion -p 5001" in pipeline_run.output


def test_the_summarys_serve_command_pasted_into_a_shell_answers_on_v1(pipeline_run: PipelineRun, tmp_path: Path):
    """The `serve:` line as printed, from another folder and with a PATH that has no venv; only
    the port is changed, to a free one."""
    [line] = [line for line in pipeline_run.output.splitlines() if line.strip().startswith("serve:")]
    command = line.split("serve:", 1)[1].split("  (OpenAI route")[0].strip()
    port = free_port()
    command = command.replace("-p 5001", f"-p {port}")
    with (tmp_path / "server.log").open("w") as log:
        process = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **ONE_THREAD_ENV,
                                   "HOME": str(tmp_path)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", process, 180)
            answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "max_tokens": 4},
                                   timeout=120)  # fmt: skip
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["choices"][0]["message"]["content"]


def test_runs_are_named_after_their_step_and_model(pipeline_run: PipelineRun):
    model_name = pipeline_run.children["download"].data.params["model_name"]
    assert pipeline_run.parent.info.run_name == f"main · {model_name}"
    for step, run in pipeline_run.children.items():
        assert run.info.run_name == f"{step} · {model_name}"


def test_steps_log_params_metrics_and_lineage(pipeline_run: PipelineRun):
    download, pipeline, onnx, evaluation = (pipeline_run.children[s] for s in ORDER)
    assert download.data.params["source.kind"] == "local_dir"
    assert download.data.params["resolved_revision"].startswith("sha256:")
    assert download.data.metrics["checkpoint_bytes"] > 0
    for step_run in (pipeline, onnx):
        assert step_run.data.tags[DOWNLOAD_RUN_TAG] == download.info.run_id
        assert step_run.data.tags[SOURCE_KEY_TAG] == download.data.tags[SOURCE_KEY_TAG]
        assert step_run.data.metrics["log_seconds"] > 0
        assert step_run.data.metrics["model_size_bytes"] > 0
    assert pipeline.data.params["do_sample"] == "False"
    assert onnx.data.params["onnx_origin"] == f"built-int4-from:{download.info.run_id}"
    for model in ("pipeline", "onnx"):
        for metric in ("answer_correct_rate", "latency_mean_s", "decode_tokens_per_s_median", "ttft_median_s"):
            assert f"{model}/{metric}" in evaluation.data.metrics
    assert 0 <= evaluation.data.metrics["parity/exact_match_rate"] <= 1
    # The ONNX model's fidelity to the float pipeline, on the answers and the shipped text.
    assert evaluation.data.metrics["parity/fidelity_positions"] >= 2000
    assert 0.5 <= evaluation.data.metrics["parity/top1_agreement"] <= 1
    assert 0 <= evaluation.data.metrics["parity/kl_divergence"] < 1
    assert evaluation.data.params["eval_rows"] == "3"


def test_manifest_checksums_match_the_logged_checkpoint(
    pipeline_run: PipelineRun, trained_tiny_phi3: Path, tmp_path: Path
):
    run_id = pipeline_run.children["download"].info.run_id
    manifest = read_manifest(
        Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="manifest.json", dst_path=str(tmp_path)))
    )
    checkpoint = Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(tmp_path))
    )
    assert verify_folder(checkpoint, manifest) == []
    weights = next(entry for entry in manifest["files"] if entry["path"] == "model.safetensors")
    assert weights["sha256"] == file_sha256(trained_tiny_phi3 / "model.safetensors")


def test_eval_table_has_each_question_and_both_answers(pipeline_run: PipelineRun, tmp_path: Path):
    run_id = pipeline_run.children["evaluate"].info.run_id
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="eval_results.json", dst_path=str(tmp_path)
            )
        ).read_text()
    )
    assert {"question", "pipeline_answer", "onnx_answer", "pipeline_correct", "onnx_correct"} <= set(table["columns"])
    assert len(table["data"]) == 3


@pytest.fixture(scope="module")
def both_models(pipeline_run: PipelineRun) -> dict[str, mlflow.pyfunc.PyFuncModel]:
    return {
        step: mlflow.pyfunc.load_model(pipeline_run.model_uri(step)) for step in ("log_pipeline", "log_onnx_wrapper")
    }


def test_both_models_answer_chat_with_the_same_response_shape(both_models):
    shapes = {}
    for step, model in both_models.items():
        response = model.predict(CHAT)
        assert isinstance(response, list)
        assert len(response) == 1
        choice = response[0]["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        assert (
            response[0]["usage"]["total_tokens"]
            == response[0]["usage"]["prompt_tokens"] + response[0]["usage"]["completion_tokens"]
        )
        shapes[step] = (sorted(response[0]), sorted(choice), sorted(response[0]["usage"]))
    assert shapes["log_pipeline"] == shapes["log_onnx_wrapper"]


@pytest.fixture(scope="module")
def onnx_folder(pipeline_run: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    local = mlflow.artifacts.download_artifacts(
        pipeline_run.model_uri("log_onnx_wrapper"), dst_path=str(tmp_path_factory.mktemp("onnx"))
    )
    return Path(local) / "artifacts" / "onnx_model"


@pytest.mark.parametrize(
    "request_",
    [
        CHAT,
        {"messages": load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=1)[0].messages, "max_tokens": 12},
    ],
    ids=["untrained-question", "trained-question"],
)
def test_onnx_wrapper_equals_a_bare_greedy_loop_and_counts_usage_with_its_tokenizer(
    both_models, onnx_folder: Path, request_
):
    response = both_models["log_onnx_wrapper"].predict(request_)[0]
    model, tokenizer = load(onnx_folder)
    tokens, prompt_tokens = bare_greedy(model, tokenizer, request_["messages"], request_["max_tokens"])
    stopped = tokens[-1] in model_tokens(onnx_folder).eos_ids
    assert response["usage"]["prompt_tokens"] == prompt_tokens
    assert response["usage"]["completion_tokens"] == len(tokens)
    assert response["choices"][0]["message"]["content"] == tokenizer.decode(tokens[:-1] if stopped else tokens)
    assert response["choices"][0]["finish_reason"] == ("stop" if stopped else "length")


def test_trained_question_is_answered_and_stops(both_models):
    messages = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=1)[0].messages
    for model in both_models.values():
        choice = model.predict({"messages": messages, "max_tokens": 12})[0]["choices"][0]
        assert choice["message"]["content"] == "Paris."
        assert choice["finish_reason"] == "stop"


def test_onnx_wrapper_accepts_the_seed_notebooks_raw_prompt(both_models):
    prompt = "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"
    via_prompt = both_models["log_onnx_wrapper"].predict({"prompt": prompt, "max_tokens": 6})[0]
    via_messages = both_models["log_onnx_wrapper"].predict(CHAT)[0]
    assert via_prompt["choices"][0]["message"]["content"] == via_messages["choices"][0]["message"]["content"]


def test_onnx_wrapper_refuses_invalid_requests_naming_the_field(both_models):
    with pytest.raises(MlflowException, match="top_p must be in"):
        both_models["log_onnx_wrapper"].predict({**CHAT, "top_p": 2.0})


def test_logged_models_pin_the_conda_yaml_versions(pipeline_run: PipelineRun, tmp_path: Path):
    pins = set(read_pins().values())
    for step in ("log_pipeline", "log_onnx_wrapper"):
        folder = Path(mlflow.artifacts.download_artifacts(pipeline_run.model_uri(step), dst_path=str(tmp_path / step)))
        requirements = [line for line in (folder / "requirements.txt").read_text().splitlines() if line]
        assert requirements
        assert set(requirements) <= pins, step
        if step == "log_onnx_wrapper":
            assert not any(line.startswith("torch") for line in requirements)
            assert "python_model.pkl" not in {p.name for p in folder.rglob("*")}


# Routes MLflow's own handler answers under both fronts: health, version, its input checks.
MLFLOW_PROBES = [("get", "/ping", None), ("get", "/version", None), ("post", "/invocations", {"max_tokens": 4}),
                 ("post", "/invocations", {"dataframe_records": [{"prompt": 5}]})]  # fmt: skip


@pytest.mark.parametrize("step", ["log_pipeline", "log_onnx_wrapper"])
def test_both_models_serve_chat_over_http_as_under_mlflow_models_serve_with_pickle_deserialization_disabled(
    pipeline_run: PipelineRun, tracking_server: TrackingServer, tmp_path: Path, step: str
):
    """The logged models through the tracking server, under MLflow's server (by model id) and ours
    (the pipeline by registered name and alias, the ONNX model by its run). Everything but chat
    requests is MLflow's own handler under ours: the same status and body as `mlflow models serve`
    gives. Ours answers `stop` on the pipeline model too, whose logging folder is gone."""
    ours = {
        "log_pipeline": "models:/e2e-pipeline@champion",
        "log_onnx_wrapper": f"runs:/{pipeline_run.children['log_onnx_wrapper'].info.run_id}/model",
    }
    probed = {}
    for front in (MLFLOW_SERVE, SLMKIT_SERVE):
        temporary = tmp_path / front / "tmp"
        temporary.mkdir(parents=True)
        env = tracking_server.env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", TMPDIR=str(temporary))
        model_uri = pipeline_run.model_uri(step) if front == MLFLOW_SERVE else ours[step]
        with served(model_uri, env, tmp_path / front / "server.log", front=front) as server:
            answer = requests.post(server.url, json=CHAT, timeout=120)
            assert answer.status_code == 200, answer.text
            body = answer.json()  # a one-element list from both models
            assert len(body) == 1
            assert body[0]["object"] == "chat.completion"
            assert body[0]["choices"][0]["finish_reason"] in ("stop", "length")
            assert body[0]["model"] == pipeline_run.children["download"].data.params["model_name"]
            if step == "log_onnx_wrapper" or front == SLMKIT_SERVE:
                refused = requests.post(server.url, json={**CHAT, "max_tokens": 0}, timeout=60)
                assert refused.status_code == 400
                assert "max_tokens must be at least 1" in refused.json()["message"]
                assert "stack_trace" not in refused.json()
                assert requests.post(server.url, json=CHAT, timeout=60).status_code == 200
            if front == SLMKIT_SERVE:
                stopped = requests.post(server.chat_url, json={**CHAT, "stop": ["."]}, timeout=60)
                assert stopped.status_code == 200, stopped.text
                assert "." not in stopped.json()["choices"][0]["message"]["content"]
            probed[front] = [
                (r.status_code, re.sub(r"\{'[^}]*\}", "{…}", r.text))  # a set's order differs from run to run
                for r in (
                    requests.request(method, server.base + path, json=body, timeout=60)
                    for method, path, body in MLFLOW_PROBES
                )
            ]
        # Stopped with SIGTERM, as systemd or docker stop it: our front removed the model it
        # fetched and its metrics folder. (MLflow's leaves its download of the model behind.)
        if front == SLMKIT_SERVE:
            assert not [p for p in temporary.rglob("*") if p.is_file() and p.name != ".ses"]
    assert probed[SLMKIT_SERVE] == probed[MLFLOW_SERVE]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-e", "download", "-P", "model=phi-9"), "error: unknown model 'phi-9'"),
        (
            ("-e", "evaluate", "-P", "pipeline_model_uri=models:/a/1", "-P", "onnx_model_uri=models:/b/1",
             "-P", "eval_set=nope.jsonl"),
            "no such file",
        ),
    ],
)  # fmt: skip
def test_bad_parameters_fail_the_run_with_one_clear_line(
    tracking_server: TrackingServer, args: tuple[str, ...], message: str
):
    result = mlflow_run(tracking_server, "--experiment-name", "bad-params", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    newest = runs_of("bad-params")[-1]
    assert newest.info.status == "FAILED"
