"""Batching concurrent requests in onnxruntime-genai, measured in-process so the wrapper's
choice rests on figures from this machine (bench figure 5's detail):

- a static batch: one Generator with `batch_size=k` over prompts padded to the longest, on the
  right (what the wrapper does, slmkit.onnx.batching) or on the left (which changes answers);
- the `Engine`/`Request` API of onnxruntime-genai 0.18, which schedules requests itself
  (continuous batching proper needs a PagedAttention build, which the builder makes only for
  CUDA fp16/bf16; on CPU the Engine runs a static engine batch).

Each returns completion tokens/s over all `k` prompts and whether every prompt's greedy tokens
equal the same prompt generated alone, which serving needs: a batch must not change answers.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from slmkit.onnx.batching import right_padded
from slmkit.onnx.greedy import chat_prompt_ids


def _rate_and_exact(outputs: list[list[int]], alone: list[list[int]], seconds: float) -> tuple[float, bool]:
    """Tokens/s counting each row only up to where it ends alone (rows of a static batch decode
    on after their EOS), and whether every row equals its prompt generated alone."""
    useful = sum(min(len(output), len(reference)) for output, reference in zip(outputs, alone, strict=True))
    exact = all(
        output[: len(reference)] == reference[: len(output)] and output
        for output, reference in zip(outputs, alone, strict=True)
    )
    return useful / seconds, exact


def _greedy_generator(model: Any, batch: np.ndarray, max_tokens: int, *, every_step: bool = False) -> Any:
    """A greedy Generator over a padded batch, with room for `max_tokens` more; with
    `every_step` it decodes all of them, ignoring end-of-text."""
    import onnxruntime_genai as og

    length = batch.shape[1] + max_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=length, min_length=length if every_step else 0, do_sample=False, batch_size=len(batch)
    )
    return og.Generator(model, params)


def static_batch(
    model: Any, tokenizer: Any, prompts: list, alone: list[list[int]], max_tokens: int, pad_id: int, side: str
) -> tuple[float, bool]:
    """One Generator over all prompts, padded with `pad_id` on the `side` "right" or "left";
    `alone` are their greedy tokens generated one by one (slmkit.onnx.greedy.bare_greedy)."""
    rows = [chat_prompt_ids(tokenizer, messages) for messages in prompts]
    batch = right_padded(rows, pad_id)
    if side == "left":
        batch = np.stack([np.roll(padded, len(padded) - len(row)) for padded, row in zip(batch, rows, strict=True)])
    generator = _greedy_generator(model, batch, max_tokens)
    outputs: list[list[int]] = [[] for _ in rows]
    started = time.perf_counter()
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
        for index, token in enumerate(generator.get_next_tokens()):
            outputs[index].append(int(token))
    return _rate_and_exact(outputs, alone, time.perf_counter() - started)


def engine_batch(
    model: Any, tokenizer: Any, prompts: list, alone: list[list[int]], max_tokens: int
) -> tuple[float, bool]:
    """All prompts as Requests of one Engine, run until none is pending."""
    import onnxruntime_genai as og

    engine = og.Engine(model)
    events = engine.create_event_buffer(64)
    requests = []
    started = time.perf_counter()
    for messages in prompts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(max_tokens)
        request.begin_turn(chat_prompt_ids(tokenizer, messages), options)
        requests.append(request)
    tokens: list[list[int]] = [[] for _ in prompts]
    while engine.has_pending_requests():
        engine.run(events)
        for position in range(len(events)):
            event = events[position]
            if event.flags & og.EngineEventFlags.TOKEN:
                index = next(i for i, request in enumerate(requests) if request == event.request)
                tokens[index].append(int(event.token))
    seconds = time.perf_counter() - started
    for request in requests:
        request.close()
    return _rate_and_exact(tokens, alone, seconds)


def prompt_and_step_ms(model: Any, tokenizer: Any, prompts: list, max_tokens: int, pad_id: int) -> tuple[float, float]:
    """Milliseconds to process the right-padded prompts of one batch, and per decode step after:
    where batching can gain (steps share the weights) and where it cannot (prompts cost alike)."""
    batch = right_padded([chat_prompt_ids(tokenizer, messages) for messages in prompts], pad_id)
    generator = _greedy_generator(model, batch, max_tokens, every_step=True)
    started = time.perf_counter()
    generator.append_tokens(batch)
    generator.generate_next_token()
    prompt_done = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return (prompt_done - started) * 1000, (time.perf_counter() - prompt_done) * 1000 / max(steps, 1)
