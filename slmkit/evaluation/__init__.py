"""Evaluating both models alike: scoring rows, MLflow scorers, measuring in a process of its own,
the comparison report and `main`'s summary, the gate that registers and promotes, and
`quantization=auto`, which chooses an ONNX build by its measured answers.
"""
