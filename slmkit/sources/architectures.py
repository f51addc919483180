"""The model architectures this project packages, and the one-line refusal of any other.

Each is supported by both transformers' GGUF loader (5.23) and onnxruntime-genai's builder
(0.18), and tested here end to end (tests/test_architectures.py). `download` refuses any other
architecture as soon as the checkpoint's config is read, instead of leaving the builder to fail
with a traceback minutes later in `log_onnx_wrapper`.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.errors import UserError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)


def checkpoint_architecture(checkpoint: Path) -> str:
    """The model class a checkpoint's config.json names (`architectures[0]`), or "" when it names none."""
    config = json.loads((checkpoint / "config.json").read_text())
    return (config.get("architectures") or [""])[0]


def check_architecture(checkpoint: Path, source: str) -> str:
    """The checkpoint's architecture, if this project can build and serve it.

    Raises:
        UserError: one line naming the architecture and the supported ones.
    """
    architecture = checkpoint_architecture(checkpoint)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{source} is a {architecture or 'model without architectures in config.json'}, which the ONNX "
            f"builder cannot build here; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture
