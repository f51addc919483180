"""A bare onnxruntime-genai greedy loop: the floor the wrapper is measured against and the
reference it must equal token for token (tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def bare_greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens for `messages` (stopping at EOS or `max_tokens`), and the prompt's length."""
    import onnxruntime_genai as og

    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, len(prompt_ids)


def load(folder: Path, threads: int | None = None) -> tuple[Any, Any]:
    """Model and tokenizer, opened with the same thread count as the wrapper uses by default."""
    import onnxruntime_genai as og

    from slmkit.onnx_session import intra_op_threads, open_model

    model = open_model(folder, threads or intra_op_threads())
    return model, og.Tokenizer(model)
