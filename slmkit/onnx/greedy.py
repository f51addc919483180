"""A bare onnxruntime-genai greedy loop: the floor the wrapper is measured against, the
reference it must equal token for token (tests/test_pipeline_e2e.py), and how `quantization=auto`
answers its calibration rows with each candidate build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.onnx.session import ModelTokens, intra_op_threads, open_model


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> np.ndarray:
    """The token ids of `messages` under the model's chat template, as onnxruntime-genai takes them."""
    text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def bare_greedy(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], max_tokens: int, tokens_of: ModelTokens | None = None
) -> tuple[list[int], int]:
    """Greedy tokens for `messages` (stopping at EOS or `max_tokens`), and the prompt's length;
    `tokens_of` (the model folder's ModelTokens) sizes the cache of a sliding-window model."""
    import onnxruntime_genai as og

    prompt = chat_prompt_ids(tokenizer, messages)
    params = og.GeneratorParams(model)
    wanted = len(prompt) + max_tokens
    params.set_search_options(max_length=tokens_of.max_length(wanted) if tokens_of else wanted, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < max_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, len(prompt)


def load(folder: Path, threads: int | None = None) -> tuple[Any, Any]:
    """Model and tokenizer, opened with the same thread count as the wrapper uses by default."""
    import onnxruntime_genai as og

    model = open_model(folder, threads or intra_op_threads())
    return model, og.Tokenizer(model)
