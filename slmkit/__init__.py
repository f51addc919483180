"""Library behind the MLflow Project's steps, in subpackages by concept.

`chat` (the contract both models speak), `sources` (presets, checkpoints, eval sets), `models`
(how each model is packaged), `onnx` (build, carry-over, runtime), `batch`, `evaluation`,
`serving`, and `workflow`, the one layer built around MLflow runs (step declarations, cache,
lineage). Most functions outside `workflow` take and return plain values; those that log or
load through MLflow say so in their docstrings.
"""

from pathlib import Path

LIBRARY = Path(__file__).resolve().parent
"""This package's folder: what logged models carry as `code_paths`."""
PROJECT_ROOT = LIBRARY.parent
