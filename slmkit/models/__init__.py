"""How each chat model is packaged as an MLflow model: the transformers pipeline and the ONNX wrapper.

The arguments handed to `mlflow.*.log_model` live here, so the steps, tests and bench log alike.
"""
