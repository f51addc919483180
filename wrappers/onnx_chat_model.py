"""Models-from-code pyfunc: an int4 ONNX chat model on onnxruntime-genai.

`log_onnx_wrapper` logs this file itself (not a pickle) with the ONNX folder as the artifact
`onnx_model`. It speaks the same request and response as the transformers pipeline logged with
`task="llm/v1/chat"`, so callers and the evaluation treat both models alike.

Logged `model_config` keys:
    model_name: the name put in each response's `model` field.
    max_new_tokens: default for requests without `max_tokens`.
    temperature: default for requests without `temperature`; 0 means greedy.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import mlflow
import onnxruntime_genai as og
from mlflow.exceptions import MlflowException
from mlflow.models import set_model

from slmkit.chat_format import (
    FINISH_LENGTH,
    FINISH_STOP,
    ChatRequest,
    ChatRequestError,
    chat_completion,
    cut_at_stop,
    parse_request,
    raw_requests,
)


class OnnxChatModel(mlflow.pyfunc.PythonModel):
    """Chat completions from an onnxruntime-genai model folder."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the model and tokenizer once; generators are made per request."""
        folder = Path(context.artifacts["onnx_model"])
        config = context.model_config or {}
        self._model = og.Model(str(folder))
        self._tokenizer = og.Tokenizer(self._model)
        genai_config = json.loads((folder / "genai_config.json").read_text())["model"]
        eos = genai_config["eos_token_id"]
        self._eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self._context_length = int(genai_config["context_length"])
        self._model_name = str(config.get("model_name", folder.name))
        self._default_max_tokens = int(config.get("max_new_tokens", 256))
        self._default_temperature = float(config.get("temperature", 0.0))
        # onnxruntime-genai objects are not thread-safe and hold the GIL: one request at a time.
        self._lock = threading.Lock()

    # No type hints on predict: MLflow would derive a second, conflicting schema from them.
    def predict(self, context, model_input, params=None):
        """Answer each chat request in `model_input`.

        Request (one JSON object, or a list/DataFrame of them):
            messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], or instead
            prompt: text already formatted with the chat template (the seed notebook's request);
            max_tokens: int >= 1; temperature: float >= 0 (0 is greedy); top_p: float in (0, 1];
            stop: [str, ...]; n: 1 only; seed: int, for reproducible sampling.

        Response per request: a ChatCompletion dict with id, object, created, model,
        choices[0].message {role, content}, choices[0].finish_reason ("stop" or "length") and
        usage {prompt_tokens, completion_tokens, total_tokens} counted with the model's tokenizer.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE naming the field of an invalid request,
                which the scoring server answers with HTTP 400 and no stack trace.
        """
        try:
            requests = [parse_request(raw) for raw in raw_requests(model_input)]
            return [self._complete(request) for request in requests]
        except ChatRequestError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from None

    def _prompt_ids(self, request: ChatRequest) -> Any:
        prompt = request.prompt
        if prompt is None:
            prompt = self._tokenizer.apply_chat_template(
                json.dumps(request.messages_as_dicts()), add_generation_prompt=True
            )
        ids = self._tokenizer.encode(prompt)
        if len(ids) >= self._context_length:
            field = "prompt" if request.prompt is not None else "messages"
            raise ChatRequestError(
                f"{field}: the prompt has {len(ids)} tokens, but the model's context is {self._context_length}; shorten it"
            )
        return ids

    def _search_options(self, request: ChatRequest, prompt_length: int) -> dict[str, Any]:
        """Only what the request or the logged defaults set; genai_config.json owns the rest."""
        max_tokens = request.max_tokens or self._default_max_tokens
        temperature = self._default_temperature if request.temperature is None else request.temperature
        options: dict[str, Any] = {"max_length": min(prompt_length + max_tokens, self._context_length)}
        if temperature == 0:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=temperature)
            if request.top_p is not None:
                options["top_p"] = request.top_p
            if request.seed is not None:
                options["random_seed"] = request.seed
        return options

    def _complete(self, request: ChatRequest) -> dict[str, Any]:
        with self._lock:
            prompt_ids = self._prompt_ids(request)
            params = og.GeneratorParams(self._model)
            params.set_search_options(**self._search_options(request, len(prompt_ids)))
            generator = og.Generator(self._model, params)
            generator.append_tokens(prompt_ids)
            stream = self._tokenizer.create_stream()
            generated: list[int] = []
            text, stopped = "", False
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                generated.append(token)
                if token in self._eos_ids:
                    stopped = True
                    break
                text += stream.decode(token)
                if request.stop:
                    text, stopped = cut_at_stop(text, request.stop)
                    if stopped:
                        break
        if not request.stop:
            text = self._tokenizer.decode([t for t in generated if t not in self._eos_ids])
        finish_reason = FINISH_STOP if stopped else FINISH_LENGTH
        return chat_completion(text, finish_reason, len(prompt_ids), len(generated), self._model_name)


set_model(OnnxChatModel())
