"""The ONNX chat wrapper in process: streaming, stop strings, context limits, sampling, tracing,
thread safety. The model is the tiny Phi-3 trained to answer the first eval rows."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from slmkit import PROJECT_ROOT
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT, wrapper_model_arguments
from slmkit.sources.eval_set import load_eval_set
from tests.conftest import bare_env

FRANCE = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=1)[0].messages


def ask(content: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], **fields}


def test_stream_chunks_join_to_the_predicted_answer(wrapper):
    whole = wrapper.predict({"messages": FRANCE, "max_tokens": 12})[0]
    chunks = list(wrapper.predict_stream({"messages": FRANCE, "max_tokens": 12}))
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert (
        "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)
        == "Paris."
        == whole["choices"][0]["message"]["content"]
    )
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_cut_the_answer_in_predict_and_stream(wrapper):
    request = {"messages": FRANCE, "max_tokens": 12, "stop": ["ri"]}
    answer = wrapper.predict(request)[0]["choices"][0]
    assert answer == {"index": 0, "message": {"role": "assistant", "content": "Pa"}, "finish_reason": "stop"}
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in wrapper.predict_stream(request))
    assert streamed == "Pa"


def test_conversation_past_the_context_is_refused_or_truncated_on_request(wrapper):
    filler = "The capital of France is Paris. " * 30
    turns = []
    for _ in range(8):
        turns += [{"role": "user", "content": filler}, {"role": "assistant", "content": "Yes."}]
    long_chat = [{"role": "system", "content": "Be brief."}, *turns, FRANCE[-1]]
    with pytest.raises(MlflowException, match=r"messages: the prompt has .* past the model's context of 512 tokens"):
        wrapper.predict({"messages": long_chat, "max_tokens": 4})
    answer = wrapper.predict({"messages": long_chat, "max_tokens": 4, "truncation": "oldest"})[0]
    assert 0 < answer["usage"]["prompt_tokens"] < 512


def test_huge_max_tokens_and_huge_payload_are_refused_fast(wrapper):
    with pytest.raises(MlflowException, match="max_tokens must be at most the model's context of 512"):
        wrapper.predict(ask("Hi", max_tokens=10**9))
    started = time.monotonic()
    with pytest.raises(MlflowException, match="characters, past the model's context"):
        wrapper.predict(ask("x" * 8_000_000))
    assert time.monotonic() - started < 5


def test_control_characters_are_refused_and_unicode_is_answered(wrapper):
    with pytest.raises(MlflowException, match=r"messages\[0\]\.content contains the control character U\+0000"):
        wrapper.predict(ask("nul\x00here"))
    answer = wrapper.predict(ask("Привет 👋 你好 — ça va?", max_tokens=4))[0]
    assert answer["usage"]["prompt_tokens"] > 0


def test_seed_makes_sampling_reproducible(wrapper):
    def sample(seed: int) -> str:
        request = ask("Tell me something.", max_tokens=16, temperature=1.5, top_p=1.0, seed=seed)
        return wrapper.predict(request)[0]["choices"][0]["message"]["content"]

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_each_request_is_traced_as_one_chat_span_whose_event_marks_the_first_token(wrapper):
    answer = wrapper.predict({"messages": FRANCE, "max_tokens": 12})[0]
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id())
    (span,) = trace.data.spans
    assert span.name == "chat"
    assert span.attributes["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert span.attributes["finish_reason"] == answer["choices"][0]["finish_reason"]
    (first_token,) = span.events
    assert first_token.name == "first_token"
    assert first_token.attributes == {"prompt_tokens": answer["usage"]["prompt_tokens"], "batch_size": 1}
    assert span.start_time_ns < first_token.timestamp < span.end_time_ns


def test_tracing_can_be_turned_off(wrapper_dir: Path):
    """`-P tracing=false` logs `tracing: "false"` in the model config; the same key given at load
    time turns tracing off without building another model."""
    arguments = wrapper_model_arguments(wrapper_dir / "artifacts" / ONNX_ARTIFACT, "tiny", {}, tracing=False)
    assert arguments["model_config"]["tracing"] == "false"
    untraced = mlflow.pyfunc.load_model(str(wrapper_dir), model_config={"tracing": "false"})
    before = mlflow.get_last_active_trace_id()
    untraced.predict({"messages": FRANCE, "max_tokens": 4})
    assert mlflow.get_last_active_trace_id() == before


# Run in a fresh interpreter: whether MLflow's SQL store module is imported yet says whether the
# tracking store was opened.
OPENS_THE_STORE_AT_LOAD = """
import sys
from slmkit.chat.adapters import load_chat_model
opened = lambda: "mlflow.store.tracking.sqlalchemy_store" in sys.modules
load_chat_model(sys.argv[1], traced=False)
print(opened())
load_chat_model(sys.argv[1])
print(opened())
"""


def test_a_traced_model_opens_its_tracking_store_at_load_not_in_the_first_request(wrapper_dir: Path, tmp_path: Path):
    """The first request would otherwise wait for it (0.64 against 0.11 s on SmolLM2, SQLite)."""
    env = {
        **bare_env(tmp_path),
        "PYTHONPATH": str(PROJECT_ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    result = subprocess.run([sys.executable, "-c", OPENS_THE_STORE_AT_LOAD, str(wrapper_dir)], env=env,
                            capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    assert result.stdout.split() == ["False", "True"]


def test_threads_sharing_one_model_get_their_own_answers(wrapper):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(12)]
    alone = {p: wrapper.predict(ask(p, max_tokens=8))[0]["choices"][0]["message"]["content"] for p in prompts}
    together: dict[str, str] = {}

    def client(chunk: list[str]) -> None:
        for prompt in chunk:
            together[prompt] = wrapper.predict(ask(prompt, max_tokens=8))[0]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(prompts[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


def test_a_list_of_requests_is_answered_as_one_batch_with_each_lone_answer(wrapper_dir: Path):
    """`predict` on a list answers its requests as concurrent clients, through the decoder's
    batches, in the list's order; each answer is the one its request gets alone."""
    model = mlflow.pyfunc.load_model(str(wrapper_dir))
    batches: list[int] = []
    model.unwrap_python_model().observe_batches(batches.append)
    rows = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=4)
    requests = [{"messages": row.messages, "max_tokens": 8} for row in rows]
    alone = [model.predict(request)[0]["choices"][0]["message"]["content"] for request in requests]
    assert batches == [1, 1, 1, 1]
    together = [answer["choices"][0]["message"]["content"] for answer in model.predict(requests)]
    assert together == alone
    assert len(set(alone)) > 1  # distinct questions, so answers given in the wrong order would show
    assert batches[4:] == [4]


def test_a_loader_whose_prompts_never_repeat_keeps_no_prompt_caches(wrapper_dir: Path):
    """`batch_infer`'s workers load the chat model with `keep_prompts=False`: a table's rows are
    not conversations, and each worker would hold its own caches. A served model keeps one a
    conversation."""
    from slmkit.chat.adapters import load_chat_model

    served = load_chat_model(str(wrapper_dir), traced=False)
    batch = load_chat_model(str(wrapper_dir), traced=False, keep_prompts=False)
    for chat in (served, batch):
        for question in ("Hi", "What is two plus two?"):
            chat.complete(ask(question, max_tokens=4))
    assert served.pyfunc_model.unwrap_python_model().kept_prompts == 2
    assert batch.pyfunc_model.unwrap_python_model().kept_prompts == 0
    served.pyfunc_model.unwrap_python_model().keep_prompts(False)
    assert served.pyfunc_model.unwrap_python_model().kept_prompts == 0
