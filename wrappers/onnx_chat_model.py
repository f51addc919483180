"""Models-from-code pyfunc: an int4 ONNX chat model on onnxruntime-genai.

`log_onnx_wrapper` logs this file itself (not a pickle) with the ONNX folder as the artifact
`onnx_model`. It speaks the same request and response as the transformers pipeline logged with
`task="llm/v1/chat"`, so callers and the evaluation treat both models alike.

Logged `model_config` keys:
    model_name: the name put in each response's `model` field.
    max_new_tokens: default for requests without `max_tokens`.
    temperature: default for requests without `temperature`; 0 means greedy.
    tracing: "true" (default) records an MLflow trace per request; "false" turns it off.
    intra_op_threads: onnxruntime threads; 0 (default) is one per available CPU
        (SLMKIT_INTRA_OP_THREADS overrides it at serving time; see slmkit.onnx.session).
    max_batch_size: greedy requests that wait together are decoded as rows of one batch, up to
        this many (default 4; 1 turns batching off; SLMKIT_MAX_BATCH_SIZE overrides it at
        serving time). See slmkit.onnx.batching.
    batch_window_ms: how long a new batch waits to hold as many requests as were in flight
        while the last one ran (default 20; a lone client never waits).

At load, the ONNX folder is checked against the manifest it carries (every file's size and
sha256) before the model is opened, so a corrupted or incomplete artifact fails with the file's
name instead of answering garbage. Set SLMKIT_VERIFY_ONNX=false to skip the check.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import onnxruntime_genai as og
from mlflow.entities import SpanEvent, SpanType
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.models import set_model

from slmkit.chat.contract import (
    FINISH_LENGTH,
    FINISH_STOP,
    ChatRequest,
    ChatRequestError,
    Messages,
    StopScanner,
    chat_chunk,
    chat_completion,
    check_max_tokens,
    fit_to_context,
    parse_request,
    raw_requests,
)
from slmkit.chat.model_config import TRACING_KEY
from slmkit.manifest import MANIFEST_NAME, read_manifest, start_verifying
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT
from slmkit.onnx.batching import (
    INDEPENDENT,
    MAX_BATCH_SIZE_ENV,
    BatchedDecoder,
    Slot,
    behaviour_sizes,
    max_batch_size,
    prompt_cache_bytes,
    prompt_cache_enabled,
)
from slmkit.onnx.behaviour_cache import kept_batch_behaviour
from slmkit.onnx.session import intra_op_threads, model_tokens, open_model

logger = logging.getLogger(__name__)

VERIFY_ENV = "SLMKIT_VERIFY_ONNX"
# The event on a request's `chat` span that marks its first token (its time to first token).
FIRST_TOKEN_EVENT = "first_token"


def open_verified(folder: Path, threads: int, verify: bool) -> Any:
    """The onnxruntime-genai model of `folder`, refused if its files differ from its manifest.

    The files' names and sizes are checked before the session opens; their sha256s are computed
    in a child process while it opens (`start_verifying`), and a difference is reported instead of
    the session, or instead of whatever error a damaged file gave onnxruntime-genai.
    """
    if not verify:
        return open_model(folder, threads)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise MlflowException(f"{folder} has no {MANIFEST_NAME}: the ONNX artifact is incomplete; log the model again")
    problems = start_verifying(folder, read_manifest(manifest_path), ignore=frozenset({MANIFEST_NAME}))
    try:
        model = open_model(folder, threads)
    except Exception:
        _refuse_differences(folder, problems())
        raise
    _refuse_differences(folder, problems())
    return model


def _refuse_differences(folder: Path, problems: list[str]) -> None:
    if problems:
        raise MlflowException(
            f"the ONNX model files in {folder} do not match their manifest: {'; '.join(problems[:5])}. "
            f"The artifact is corrupted or incomplete: log the model again, or set {VERIFY_ENV}=false to load it anyway"
        )


@dataclass
class Generation:
    """What one request produced so far; filled in while tokens are generated."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = FINISH_LENGTH
    text: str = ""

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _invalid(error: ChatRequestError) -> MlflowException:
    """The scoring server answers this with HTTP 400 and no stack trace."""
    return MlflowException.invalid_parameter_value(str(error))


def server_deadline() -> float | None:
    """When the scoring server will have answered 504: generation stops then, not later.

    `mlflow models serve` sets the timeout variable for its workers; in-process use has none.
    """
    if MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name not in os.environ:
        return None
    return time.monotonic() + MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()


class OnnxChatModel(mlflow.pyfunc.PythonModel):
    """Chat completions from an onnxruntime-genai model folder."""

    # The explicit chat signature governs the input, not type hints on `predict` (which would
    # derive a second, conflicting schema): skip MLflow's type-hint wrapping and its advice to add
    # them, printed on every load. MLflow's own ChatModel sets the same attribute for this reason.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the model and tokenizer once; generators are made per request."""
        folder = Path(context.artifacts[ONNX_ARTIFACT])
        config = context.model_config or {}
        verify = os.environ.get(VERIFY_ENV, "true").lower() != "false"
        threads = intra_op_threads(int(config.get("intra_op_threads", 0)))
        self._model = open_verified(folder, threads, verify)
        self._tokenizer = og.Tokenizer(self._model)
        tokens = model_tokens(folder)
        self._eos_ids, self._context_length = tokens.eos_ids, tokens.context_length
        self._model_name = str(config.get("model_name", folder.name))
        self._default_max_tokens = int(config.get("max_new_tokens", 256))
        self._default_temperature = float(config.get("temperature", 0.0))
        self._tracing = str(config.get(TRACING_KEY, "true")).lower() == "true"
        try:
            batch_size = max_batch_size(config.get("max_batch_size"))
        except ValueError as error:
            raise MlflowException(f"{MAX_BATCH_SIZE_ENV} or model_config: {error}") from None
        try:
            cache_bytes = prompt_cache_bytes()
        except ValueError as error:
            raise MlflowException(str(error)) from None
        # A folder checked against its manifest may take the behaviour measured on it before.
        behaviour = None
        if verify and batch_size > 1:
            sizes = behaviour_sizes(batch_size)
            behaviour = kept_batch_behaviour(folder / MANIFEST_NAME, self._model, tokens, sizes, threads)
        # onnxruntime-genai objects are not thread-safe and hold the GIL: every call into the
        # model goes through the decoder, which serialises them and batches waiting requests.
        self._decoder = BatchedDecoder(
            self._model,
            tokens,
            max_batch_size=batch_size,
            batch_window_s=float(config.get("batch_window_ms", 20)) / 1000,
            reuse_prompts=prompt_cache_enabled(),
            behaviour=behaviour,
            prompt_cache_bytes=cache_bytes,
        )
        if self._decoder.behaviour != INDEPENDENT:
            logger.warning(
                "on this machine a row of this model decodes differently alone and in a batch "
                "(onnxruntime's kernels): %s, so that every answer stays the one it gets alone",
                "batching is off"
                if self._decoder.max_batch_size == 1
                else "a lone request runs beside a copy of itself",
            )

    @property
    def model_name(self) -> str:
        """The name every answer carries in its `model` field."""
        return self._model_name

    @property
    def traced(self) -> bool:
        """Whether each request records an MLflow trace (the `tracing` model config)."""
        return self._tracing

    @property
    def kept_prompts(self) -> int:
        """How many conversations' caches are kept for their next turns (slmkit.onnx.batching)."""
        return self._decoder.kept_prompts

    def keep_prompts(self, enabled: bool) -> None:
        """Keep, or stop keeping and drop, lone requests' caches for later prompts: a loader whose
        prompts never repeat (a batch of table rows) saves the memory they would hold."""
        self._decoder.reuse_prompts = enabled

    def observe_batches(self, callback: Callable[[int], None]) -> None:
        """Have `callback` told the row count of every decoding batch as it starts."""
        self._decoder.on_batch = callback

    def expect_requests(self, in_flight: Callable[[], int]) -> None:
        """Have each new batch wait, up to its window, for as many requests as `in_flight()`
        says the server holds: requests sent together then share a batch from the first."""
        self._decoder.requests_in_flight = in_flight

    # No type hints on predict: MLflow would derive a second, conflicting schema from them.
    def predict(self, context, model_input, params=None):
        """Answer each chat request in `model_input`.

        Request (one JSON object, or a list/DataFrame of them):
            messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], or instead
            prompt: text already formatted with the chat template (the seed notebook's request);
            max_tokens: int >= 1, at most the context length; temperature: float >= 0 (0 is
            greedy); top_p: float in (0, 1]; stop: [str, ...]; n: 1 only; seed: int, for
            reproducible sampling; truncation: "none" (refuse a conversation past the context)
            or "oldest" (drop the oldest non-system turns until it fits).

        Response per request: a ChatCompletion dict with id, object, created, model,
        choices[0].message {role, content}, choices[0].finish_reason ("stop" or "length") and
        usage {prompt_tokens, completion_tokens, total_tokens} counted with the model's tokenizer.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE naming the field of an invalid request,
                which the scoring server answers with HTTP 400 and no stack trace.
        """
        try:
            requests = [parse_request(raw) for raw in raw_requests(model_input)]
        except ChatRequestError as error:
            raise _invalid(error) from None
        rows = self._decoder.max_batch_size
        if len(requests) == 1 or rows == 1:
            return [self._complete(request) for request in requests]
        # A list is answered as concurrent clients are, a batch's worth at a time, each request
        # on a thread of its own through the decoder, which batches them and keeps each lone answer.
        answers: list[dict[str, Any]] = []
        for start in range(0, len(requests), rows):
            together = requests[start : start + rows]
            with self._decoder.expecting(len(together)), ThreadPoolExecutor(len(together)) as pool:
                answers += pool.map(self._complete, together)
        return answers

    def predict_stream(self, context, model_input, params=None):
        """Stream one request as ChatCompletionChunk dicts; the last has finish_reason and usage.

        Text is decoded with onnxruntime-genai's tokenizer stream, so a multi-byte character is
        never split across chunks; stop strings are applied across chunk boundaries.
        """
        try:
            raws = raw_requests(model_input)
            if len(raws) != 1:
                raise ChatRequestError("predict_stream takes exactly one request")
            request = parse_request(raws[0], streaming=True)
        except ChatRequestError as error:
            raise _invalid(error) from None
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        generation = Generation()
        pieces = self._generate(request, generation)
        try:
            for piece in pieces:
                if piece:
                    yield chat_chunk(completion_id, created, self._model_name, piece, None)
        except GeneratorExit:  # closed early: the request's decoder row is dropped right here
            pieces.close()
            logger.warning(
                "the caller left mid-stream; generation stopped after %d tokens", generation.completion_tokens
            )
            raise
        yield chat_chunk(completion_id, created, self._model_name, "", generation.finish_reason, generation.usage())

    def _complete(self, request: ChatRequest) -> dict[str, Any]:
        generation = Generation()
        for _ in self._generate(request, generation):
            pass
        return chat_completion(
            generation.text,
            generation.finish_reason,
            generation.prompt_tokens,
            generation.completion_tokens,
            self._model_name,
        )

    def _span(self) -> Any:
        if not self._tracing:
            return contextlib.nullcontext()
        return mlflow.start_span(name="chat", span_type=SpanType.CHAT_MODEL)

    def _encode(self, request: ChatRequest) -> Any:
        """Token ids of the templated prompt, dropping old turns if the request allows it."""

        def render(messages: Messages) -> str:
            as_dicts = [{"role": role, "content": content} for role, content in messages]
            return self._tokenizer.apply_chat_template(json.dumps(as_dicts), add_generation_prompt=True)

        return fit_to_context(request, render, self._tokenizer.encode, self._context_length)[1]

    def _budget_and_sampling(self, request: ChatRequest) -> tuple[int, dict[str, Any] | None]:
        """The request's token budget, and its sampling options (None for greedy decoding).

        Only what the request or the logged defaults set; genai_config.json owns the rest.
        """
        max_tokens = check_max_tokens(request.max_tokens or self._default_max_tokens, self._context_length)
        temperature = self._default_temperature if request.temperature is None else request.temperature
        if temperature == 0:
            return max_tokens, None
        sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature}
        if request.top_p is not None:
            sampling["top_p"] = request.top_p
        if request.seed is not None:
            sampling["random_seed"] = request.seed
        return max_tokens, sampling

    def _generate(self, request: ChatRequest, generation: Generation) -> Iterator[str]:
        """Yield decoded text pieces while filling in `generation`.

        One span a request: its `first_token` event marks the end of the prompt's part (waiting
        for a batch, processing the prompt), with `prompt_tokens` and `batch_size`. A `prompt` and
        a `decode` span of their own said nothing more, and each span is a store write whose time
        comes out of decoding (the GIL, which each step holds, and the cores): the `prompt` span
        was 4.5 of the 24.5 ms a traced request added (export made synchronous, SQLite store).
        """
        deadline = server_deadline()  # before the span, which may first open the tracking store
        with self._span() as root, contextlib.ExitStack() as cleanup:
            try:
                prompt_ids = self._encode(request)
                slot = Slot(prompt_ids, *self._budget_and_sampling(request), deadline=deadline)
            except ChatRequestError as error:
                raise _invalid(error) from None
            generation.prompt_tokens = len(prompt_ids)
            # Closed on the way out, however the caller leaves, so the request's row is dropped.
            tokens = cleanup.enter_context(contextlib.closing(self._decoder.generate(slot)))
            first = list(itertools.islice(tokens, 1))
            if root:
                attributes = {"prompt_tokens": len(prompt_ids), "batch_size": slot.batch_size}
                root.add_event(SpanEvent(FIRST_TOKEN_EVENT, attributes=attributes))
            yield from self._decode(itertools.chain(first, tokens), request, generation)
            if slot.timed_out:
                logger.warning(
                    "request passed the server timeout; generation stopped after %d tokens",
                    generation.completion_tokens,
                )
            if root:
                root.set_attributes(
                    {**generation.usage(), "finish_reason": generation.finish_reason, "model": self._model_name}
                )

    def _decode(self, tokens: Iterator[int], request: ChatRequest, generation: Generation) -> Iterator[str]:
        stream, scanner = self._tokenizer.create_stream(), StopScanner(request.stop)
        kept: list[int] = []
        for token in tokens:
            generation.completion_tokens += 1
            if token in self._eos_ids:
                generation.finish_reason = FINISH_STOP
                break
            kept.append(token)
            yield scanner.feed(stream.decode(token))
            if scanner.stopped:
                generation.finish_reason = FINISH_STOP
                break
        yield scanner.flush()
        # Without stop strings the whole decode is exact, also where pieces would join differently.
        generation.text = scanner.text if request.stop else self._tokenizer.decode(kept)


set_model(OnnxChatModel())
