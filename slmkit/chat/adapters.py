"""Either logged chat model behind one in-process interface: validated, with `stop`, streaming.

The serving front (`slmkit.serve`) answers every request through these adapters, so both models
get the same checks from `slmkit.chat.contract` before anything reaches them:

- `WrapperChat`, the ONNX wrapper: already speaks the contract; `predict_stream` streams tokens.
- `PipelineChat`, MLflow's transformers `llm/v1/chat` flavor. Around MLflow's own `predict` it
  adds what the flavor lacks: the context check before generation, `temperature: 0` as greedy,
  and `stop`. MLflow turns `stop` into stopping criteria by loading a tokenizer by the model's
  recorded name (`llm_inference_utils._get_stopping_criteria`), which needs the hub; here the
  stop strings never reach MLflow: generation ends through `StopOnRequest`, which the logged
  `model_config` declares (key `stopping_criteria`, see `slmkit.models.pipeline`) and this module
  fills at load, and the answer is cut before the stop string as the ONNX wrapper cuts it.
  The flavor has no `predict_stream`, so the pipeline streams its whole answer as one chunk.

Use `load_chat_model(uri)` in process for the same behaviour as the server.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from slmkit.chat.contract import (
    FINISH_STOP,
    REQUEST_FIELDS,
    ChatRequest,
    ChatRequestError,
    Messages,
    chat_chunk,
    check_max_tokens,
    cut_at_stop,
    fit_to_context,
    parse_request,
)
from slmkit.chat.model_config import STOPPING_CRITERIA_KEY, TRACING_KEY

logger = logging.getLogger(__name__)


class ChatModel(Protocol):
    """A loaded chat model as the serving front uses it."""

    name: str
    pyfunc_model: Any

    def complete(self, raw: Mapping[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """One ChatCompletion for a raw request; ChatRequestError names a bad field."""
        ...

    def stream(self, raw: Mapping[str, Any], deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """ChatCompletionChunks; the last has finish_reason and usage."""
        ...

    def observe_batches(self, callback: Callable[[int], None]) -> None:
        """Have `callback` told the row count of each decoding batch."""
        ...

    def expect_requests(self, in_flight: Callable[[], int]) -> None:
        """Tell the model how many requests the server holds (`in_flight()`), for its batches."""
        ...


def is_refusal(error: Exception) -> bool:
    """A request the model refused as invalid (a 4xx), as opposed to a failure of the model."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, ChatRequestError) or (
        isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500
    )


def model_fields(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request's fields that the models take; OpenAI-only ones (`model`, `user`) stay out."""
    return {key: value for key, value in request.items() if key in REQUEST_FIELDS and key != "stream"}


class WrapperChat:
    """The ONNX wrapper, which validates, stops and streams by itself."""

    def __init__(self, pyfunc_model: Any) -> None:
        self.pyfunc_model = pyfunc_model
        self._python_model = pyfunc_model.unwrap_python_model()
        self.name: str = self._python_model.model_name

    def complete(self, raw: Mapping[str, Any], deadline: float | None = None) -> dict[str, Any]:
        parse_request(raw)
        return self.pyfunc_model.predict(model_fields(raw))[0]

    def stream(self, raw: Mapping[str, Any], deadline: float | None = None) -> Iterator[dict[str, Any]]:
        parse_request(raw, streaming=True)
        return self.pyfunc_model.predict_stream(model_fields(raw))

    def observe_batches(self, callback: Callable[[int], None]) -> None:
        self._python_model.observe_batches(callback)

    def expect_requests(self, in_flight: Callable[[], int]) -> None:
        if hasattr(self._python_model, "expect_requests"):  # a wrapper logged before it had one batches without
            self._python_model.expect_requests(in_flight)


@dataclass
class _Request:
    """What the stopping criterion needs to know of the request running on its thread."""

    stop: tuple[str, ...]
    deadline: float | None
    prompt_length: int | None = None


def stop_on_request() -> Any:
    """A transformers StoppingCriteria that ends generation at the running request's stop
    strings or deadline. One instance serves every thread: the request is thread-local, and a
    deep copy (the flavor copies its model_config per call) is the instance itself. Its
    `tokenizer` is set once the model it serves is loaded."""
    import torch
    from transformers import StoppingCriteria

    class StopOnRequest(StoppingCriteria):
        def __init__(self) -> None:
            self.local = threading.local()
            self.tokenizer: Any = None

        def __deepcopy__(self, memo: dict) -> StopOnRequest:
            return self

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            request: _Request | None = getattr(self.local, "request", None)
            done = False
            if request is not None:
                if request.prompt_length is None:  # called first once one token is appended
                    request.prompt_length = input_ids.shape[1] - 1
                expired = request.deadline is not None and time.monotonic() > request.deadline
                text = self.tokenizer.decode(input_ids[0, request.prompt_length :]) if request.stop else ""
                done = expired or cut_at_stop(text, request.stop)[1]
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StopOnRequest()


class PipelineChat:
    """MLflow's transformers `llm/v1/chat` model, with the checks and `stop` it lacks."""

    def __init__(self, pyfunc_model: Any, stopper: Any | None) -> None:
        self.pyfunc_model = pyfunc_model
        pipeline = pyfunc_model.get_raw_model()
        self._tokenizer = pipeline.tokenizer
        self._context_length = int(pipeline.model.config.max_position_embeddings)
        self._default_max_tokens = int(pyfunc_model.model_config.get("max_new_tokens", 256))
        self._samples = bool(pyfunc_model.model_config.get("do_sample", False))
        self._stopper = stopper
        self._on_batch: Callable[[int], None] | None = None
        self.name: str = pyfunc_model.metadata.flavors["transformers"].get("source_model_name") or ""

    def _render(self, messages: Messages) -> str:
        as_dicts = [{"role": role, "content": content} for role, content in messages]
        return self._tokenizer.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        """What MLflow's flavor gets: messages that fit, a budget that fits, no stop strings."""
        if request.prompt is not None:
            raise ChatRequestError("prompt is not supported by the transformers pipeline model: send messages")
        if request.seed is not None and self._samples:
            raise ChatRequestError("seed is not supported by the transformers pipeline model")
        messages, prompt_ids = fit_to_context(request, self._render, self._encode, self._context_length)
        max_tokens = check_max_tokens(request.max_tokens or self._default_max_tokens, self._context_length)
        payload: dict[str, Any] = {
            "messages": [{"role": role, "content": content} for role, content in messages or ()],
            # The flavor would run past the context and fail; the ONNX wrapper ends there too.
            "max_tokens": min(max_tokens, self._context_length - len(prompt_ids)),
        }
        if request.temperature == 0 and self._samples:
            payload["top_k"] = 1  # greedy within sampling: the flavor takes no do_sample per request
        elif request.temperature:
            payload["temperature"] = request.temperature
        if request.top_p is not None:
            payload["top_p"] = request.top_p
        return payload

    def complete(self, raw: Mapping[str, Any], deadline: float | None = None) -> dict[str, Any]:
        return self._complete(parse_request(raw), deadline)

    def _complete(self, request: ChatRequest, deadline: float | None) -> dict[str, Any]:
        payload = self._payload(request)
        if self._stopper is not None:
            self._stopper.local.request = _Request(request.stop, deadline)
        if self._on_batch is not None:
            self._on_batch(1)
        try:
            answer = self.pyfunc_model.predict(payload)[0]
        finally:
            if self._stopper is not None:
                self._stopper.local.request = None
        text = answer["choices"][0]["message"]["content"] or ""
        cut, stopped = cut_at_stop(text, request.stop)
        if stopped:
            completion_tokens = len(self._encode(cut))
            answer["choices"][0]["message"]["content"] = cut
            answer["choices"][0]["finish_reason"] = FINISH_STOP
            usage = answer["usage"]
            usage.update(completion_tokens=completion_tokens, total_tokens=usage["prompt_tokens"] + completion_tokens)
        return answer

    def stream(self, raw: Mapping[str, Any], deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """The whole answer as one chunk, then the closing chunk: the flavor cannot stream."""
        answer = self._complete(parse_request(raw, streaming=True), deadline)
        choice, chunk_id = answer["choices"][0], f"chatcmpl-{uuid.uuid4().hex}"
        yield chat_chunk(chunk_id, answer["created"], self.name, choice["message"]["content"], None)
        yield chat_chunk(chunk_id, answer["created"], self.name, "", choice["finish_reason"], answer["usage"])

    def observe_batches(self, callback: Callable[[int], None]) -> None:
        """The flavor answers one request per call: every batch has one row."""
        self._on_batch = callback

    def expect_requests(self, in_flight: Callable[[], int]) -> None:
        """The flavor answers one request per call: it has no batch to wait for."""


# A file only the flat layout of slmkit had (before its subpackages): a model carrying it imports
# `slmkit.chat_format` and the like, which this layout does not have.
FLAT_LAYOUT_MARKER = "chat_format.py"


def _carries_flat_library(model_dir: Path, flavors: Mapping[str, Any]) -> bool:
    code = flavors.get("python_function", {}).get("code")
    return bool(code) and (model_dir / code / "slmkit" / FLAT_LAYOUT_MARKER).is_file()


@contextlib.contextmanager
def _own_library_while_loading() -> Iterator[None]:
    """While a model logged by the flat layout loads, `slmkit` resolves to the copy it carries.

    MLflow 3.17 puts a model's code path first on `sys.path` (`_add_code_to_system_path`) but
    keeps modules already imported, so in a process that imported this layout's `slmkit` the
    old wrapper's `from slmkit.chat_format import …` would fail. This process's modules are set
    aside while the model imports its own, and put back after: the model keeps the functions it
    bound, every later import here gets this layout's.
    """
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "slmkit"}
    for name in ours:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "slmkit"]:
            del sys.modules[name]
        sys.modules.update(ours)


def load_pyfunc(
    model_uri: str,
    model_config: dict[str, Any] | None = None,
    flavors: Mapping[str, Any] | None = None,
    suppress_warnings: bool = False,
) -> Any:
    """`mlflow.pyfunc.load_model`, also for an ONNX wrapper logged by slmkit's flat layout.

    A model that carries code is fetched to a local folder first (as MLflow does itself), so the
    copy of slmkit it carries can be looked at before it is imported. `flavors`, from an MLmodel
    the caller read already, saves reading it again. `suppress_warnings` is MLflow's: it also
    skips the check of the model's requirements against every installed distribution.
    """
    import mlflow

    def load(uri: str) -> Any:
        return mlflow.pyfunc.load_model(uri, model_config=model_config, suppress_warnings=suppress_warnings)

    flavors = mlflow.models.Model.load(model_uri).flavors if flavors is None else flavors
    if not flavors.get("python_function", {}).get("code"):
        return load(model_uri)
    model_dir = Path(model_uri) if Path(model_uri).is_dir() else Path(mlflow.artifacts.download_artifacts(model_uri))
    if not _carries_flat_library(model_dir, flavors):
        return load(str(model_dir))
    with _own_library_while_loading():
        return load(str(model_dir))


def open_trace_store() -> None:
    """Open the tracking store the traces go to now, at load, not in the first request's span:
    0.5 to 0.9 s on a SQLite store (MLflow's imports and schema check), which that request would
    wait. MLflow keeps one store per URI, and the trace writer takes the same one. A store that
    cannot be opened is only logged: tracing never stops a model from answering."""
    import mlflow

    try:
        mlflow.MlflowClient()
    except Exception as error:  # MLflow's trace writes fail the same way later, logged, not raised
        logger.warning("the tracking store for traces did not open: %s", error)


def load_chat_model(model_uri: str, traced: bool = True, keep_prompts: bool = True) -> ChatModel:
    """Load either model (any URI MLflow resolves) behind the ChatModel interface; `traced=False`
    turns the ONNX wrapper's per-request traces off (the pipeline records none), and
    `keep_prompts=False` its prompt caches, for callers whose prompts never repeat."""
    import mlflow

    from slmkit.errors import UserError

    # Model.load reads only the MLmodel file (of a folder, or fetched for a URI): the flavors
    # decide how to load, and a served folder's model id need not exist in any store.
    flavors = mlflow.models.Model.load(model_uri).flavors
    if "transformers" in flavors:
        model_config = flavors["python_function"].get("config") or {}
        if STOPPING_CRITERIA_KEY not in model_config:  # logged elsewhere: stop strings still cut the answer
            return PipelineChat(mlflow.pyfunc.load_model(model_uri), None)
        from transformers import StoppingCriteriaList

        stopper = stop_on_request()
        model = mlflow.pyfunc.load_model(
            model_uri, model_config={STOPPING_CRITERIA_KEY: StoppingCriteriaList([stopper])}
        )
        stopper.tokenizer = model.get_raw_model().tokenizer
        return PipelineChat(model, stopper)
    if "python_function" in flavors:
        model = load_pyfunc(model_uri, None if traced else {TRACING_KEY: "false"}, flavors)
        python_model = model.unwrap_python_model()
        if hasattr(python_model, "observe_batches"):
            if getattr(python_model, "traced", False):
                open_trace_store()
            if not keep_prompts and hasattr(python_model, "keep_prompts"):  # logged before it: keeps one
                python_model.keep_prompts(False)
            return WrapperChat(model)
    raise UserError(f"{model_uri} is neither an slmkit ONNX chat wrapper nor a transformers llm/v1/chat model")
