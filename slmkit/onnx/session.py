"""Opening an onnxruntime-genai model with the session settings that decide its speed.

onnxruntime sizes its intra-op thread pool from the physical cores it detects; on a 2-vCPU
machine that is one thread, and `make bench` measured greedy decoding of SmolLM2-135M int4 at
~95 tokens/s with one thread against ~230 with two. So the model is opened with one intra-op
thread per CPU this process may run on, unless told otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREADS_ENV = "SLMKIT_INTRA_OP_THREADS"


def intra_op_threads(configured: int = 0) -> int:
    """Threads for the model's session: SLMKIT_INTRA_OP_THREADS, else `configured`, else one
    per CPU this process may use (divide by the worker count when serving with `-w N`)."""
    from_env = os.environ.get(THREADS_ENV, "")
    if from_env:
        return int(from_env)
    return configured or len(os.sched_getaffinity(0))


def open_model(folder: Path, threads: int) -> Any:
    """An `og.Model` of `folder` with `threads` intra-op threads, genai_config.json otherwise."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


@dataclass(frozen=True)
class ModelTokens:
    """What genai_config.json says of the model's tokens, which decoding and batching go by."""

    pad_id: int
    eos_ids: frozenset[int]
    context_length: int
    # A model with sliding-window layers (Gemma 3: 512) needs a KV cache at least that long,
    # whatever the request: onnxruntime's GroupQueryAttention refuses a shorter one. 0 where the
    # window applies to no layer (see `window_cache_length`).
    min_cache_length: int = 0
    # Bytes of keys and values a Generator holds per position of its max_length, counted as
    # float32 (the builder's CPU caches); 0 where genai_config.json does not say.
    kv_bytes_per_position: int = 0

    def max_length(self, wanted: int) -> int:
        """The generator's `max_length` for `wanted` tokens (prompt and new ones): at least the
        sliding window, at most the context. Callers stop each row at its own token count."""
        return min(max(wanted, self.min_cache_length), self.context_length)


def model_tokens(folder: Path) -> ModelTokens:
    """The pad id, end-of-text ids (one or a list in the file), context length, sliding window and
    cache bytes per position of `folder`."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    eos = config["eos_token_id"]
    return ModelTokens(
        pad_id=int(config["pad_token_id"]),
        eos_ids=frozenset(eos if isinstance(eos, list) else [eos]),
        context_length=int(config["context_length"]),
        min_cache_length=window_cache_length(config["decoder"].get("sliding_window") or {}),
        kv_bytes_per_position=kv_bytes_per_position(config["decoder"]),
    )


def kv_bytes_per_position(decoder: dict[str, Any]) -> int:
    """Keys and values of every layer for one position, in float32 bytes; 0 if a size is missing."""
    sizes = [decoder.get(key, 0) for key in ("num_hidden_layers", "num_key_value_heads", "head_size")]
    layers, heads, head_size = (int(size) for size in sizes)
    return 2 * layers * heads * head_size * 4


def window_cache_length(sliding_window: dict[str, Any]) -> int:
    """The shortest KV cache genai_config.json's `sliding_window` allows: its window and slack
    where it names windowed layers, else 0.

    Why: the builder writes the section for any config with a `sliding_window`, listing the layers
    it windows. Phi-3-mini's config has one (2047) that transformers' layer types apply to no
    layer: `layers` is empty and every GroupQueryAttention has `local_window_size` -1. Sizing its
    cache to the window anyway allocated and zeroed 2047 positions a request (4.8 GB for 3 rows at
    Phi-3-mini's size, 3.8 s) and turned the reuse of a conversation's cache off. A section
    without `layers` is taken as windowing every layer.
    """
    if not sliding_window or sliding_window.get("layers") == []:
        return 0
    return int(sliding_window.get("window_size", 0)) + int(sliding_window.get("cache_slack", 0))
