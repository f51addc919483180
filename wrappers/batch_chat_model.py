"""Models-from-code pyfunc that `mlflow.pyfunc.spark_udf` runs for the `batch_infer` step.

It holds either chat model as its artifact `chat_model` and answers a pandas batch of JSON
`request` strings with `slmkit.batch.rows.answer_requests`: the same checks and `stop` as
the serving front, a refused row's message in `error` instead of a failed task, and several
greedy rows decoded together by the ONNX wrapper's batching. Spark loads it once per executor
Python worker.

Rows are not traced (a trace per row of a large table would outweigh the answers).

`model_config`: `concurrency`, rows answered at once (0, the default: 4 for the ONNX wrapper,
1 for the transformers pipeline).
"""

from __future__ import annotations

import mlflow
from mlflow.models import set_model

from slmkit.batch.rows import REQUEST_COLUMN, answer_requests, answers_json, default_concurrency
from slmkit.chat.adapters import load_chat_model


class BatchChatModel(mlflow.pyfunc.PythonModel):
    """Answers a batch of chat requests, one output row per input row."""

    # Its signature governs the input: no type-hint wrapping (see wrappers/onnx_chat_model.py).
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # A trace per row of a large table would cost more than the answers: batch rows are untraced.
        # Nor do they keep prompt caches: a table's rows are not conversations, and every Spark
        # worker would hold its own (up to 4 GiB at Phi-3-mini's size).
        self._chat = load_chat_model(context.artifacts["chat_model"], traced=False, keep_prompts=False)
        configured = int((context.model_config or {}).get("concurrency", 0))
        self._concurrency = configured or default_concurrency(self._chat)

    def predict(self, context, model_input, params=None):
        """A DataFrame with column `request` (JSON) in; per row, a JSON object with answer,
        finish_reason, prompt_tokens, completion_tokens and error out (column `answer_json`)."""
        return answers_json(answer_requests(self._chat, list(model_input[REQUEST_COLUMN]), self._concurrency))


set_model(BatchChatModel())
