"""The transformers text-generation pipeline that MLflow logs as an `llm/v1/chat` model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmkit.errors import UserError

TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")


def check_generation_settings(temperature: float, max_new_tokens: int) -> None:
    """Refuse generation defaults no model can use."""
    if not temperature >= 0:
        raise UserError(f"temperature={temperature}: must be >= 0 (0 means greedy)")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens}: must be at least 1")


def generation_config(temperature: float, max_new_tokens: int) -> dict[str, Any]:
    """The pipeline's `model_config`: greedy at temperature 0, so evaluations repeat.

    MLflow's chat task refuses `temperature=0` from transformers, so greedy is `do_sample=False`.
    """
    check_generation_settings(temperature, max_new_tokens)
    if temperature == 0:
        return {"do_sample": False, "max_new_tokens": max_new_tokens}
    return {"do_sample": True, "temperature": temperature, "max_new_tokens": max_new_tokens}


def check_dtype(torch_dtype: str) -> str:
    if torch_dtype not in TORCH_DTYPES:
        raise UserError(f"torch_dtype={torch_dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    return torch_dtype


def build_pipeline(checkpoint: Path, torch_dtype: str) -> Any:
    """A text-generation pipeline over a local checkpoint; `auto` keeps the checkpoint's dtype.

    Remote code is never trusted: only architectures that transformers ships are loaded.
    """
    import transformers

    return transformers.pipeline(
        "text-generation",
        model=str(checkpoint),
        dtype=check_dtype(torch_dtype),
        trust_remote_code=False,
    )
