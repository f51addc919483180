"""The transformers text-generation pipeline that MLflow logs as an `llm/v1/chat` model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmkit.errors import UserError, check_choice

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
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    return {**sampling, "max_new_tokens": max_new_tokens}


def pipeline_model_arguments(pipeline: Any, generation: dict[str, Any], model_license: str = "") -> dict[str, Any]:
    """What `mlflow.transformers.log_model` / `save_model` get besides the name or path.

    `stopping_criteria` is declared empty so that a loader may set it (MLflow only lets
    `load_model(model_config=…)` override logged keys): `slmkit.chat.adapters` puts the criterion
    there that ends generation at a request's stop strings without the hub.

    The model card is given, not fetched: MLflow would ask the hub for the card of the model's
    recorded name, which is not a repo id. It carries `model_license` (MLflow writes it to LICENSE.txt);
    "other" when unknown, which MLflow reports as a warning to check the license by hand.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from slmkit.chat.model_config import STOPPING_CRITERIA_KEY
    from slmkit.environment import PIPELINE_PACKAGES, model_requirements

    name = pipeline.model.name_or_path
    card = ModelCard.from_template(ModelCardData(license=model_license or "other"), model_id=name)
    return {
        "transformers_model": pipeline,
        "task": "llm/v1/chat",
        "model_config": {**generation, STOPPING_CRITERIA_KEY: None},
        "pip_requirements": model_requirements(PIPELINE_PACKAGES),
        "model_card": card,
    }


def check_dtype(torch_dtype: str) -> str:
    return check_choice("torch_dtype", torch_dtype, TORCH_DTYPES)


def build_pipeline(checkpoint: Path, torch_dtype: str, model_name: str, gguf: Path | None = None) -> Any:
    """A text-generation pipeline over a local checkpoint; `auto` keeps the checkpoint's dtype.
    For a GGUF source the weights come from the file (`gguf`), float32 under `auto`: the
    checkpoint holds its config and tokenizer only (slmkit.sources.checkpoint.convert_gguf).

    Remote code is never trusted: only architectures that transformers ships are loaded. MLflow
    records the model's `name_or_path` as the model's name (the `model` of every answer), which
    would be the scratch folder it was loaded from: it is set to `model_name`, so the logged
    model never names a folder of the machine that logged it.
    """
    import transformers

    from slmkit.sources.checkpoint import float_model

    dtype = check_dtype(torch_dtype)
    if gguf is None:
        pipeline = transformers.pipeline("text-generation", model=str(checkpoint), dtype=dtype, trust_remote_code=False)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        pipeline = transformers.pipeline(
            "text-generation", model=float_model(checkpoint, gguf, dtype), tokenizer=tokenizer
        )
    pipeline.model.name_or_path = model_name
    return pipeline
