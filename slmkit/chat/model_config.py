"""The `model_config` keys that a logged model declares and a loader sets, named once for both.

MLflow lets `load_model(model_config=…)` override only keys the model was logged with, so each
key here is written by the packaging (`slmkit.models`) and read or overridden by the loaders
(`slmkit.chat.adapters`, the wrapper in `wrappers/onnx_chat_model.py`).
"""

# The ONNX wrapper's switch: "true" traces every request, "false" none.
TRACING_KEY = "tracing"
# The pipeline's transformers StoppingCriteriaList, declared empty at logging and filled at load.
STOPPING_CRITERIA_KEY = "stopping_criteria"
