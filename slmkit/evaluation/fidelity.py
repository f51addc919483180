"""Fidelity: how closely a model keeps the float reference's next-token distributions.

Measured the way llama.cpp's `llama-perplexity --kl-divergence` does, so figures compare with the
field's: both models are teacher-forced along the same tokens, and at every scored position we ask
whether the top-1 token is the reference's, and what the KL divergence KL(P_ref || P_model) over
the whole vocabulary is. The reference is transformers in float32 on the checkpoint `download`
made (the file's own dequantized weights, for a GGUF source).

The scored tokens are the eval rows' reference answers (the pipeline model's own, after its chat
prompt) and a text the project ships (`data/fidelity_text.txt`, the Apache License 2.0), read in
windows of WINDOW tokens whose first CONTEXT tokens only give context, as llama-perplexity scores
the second half of each chunk: at least 2,000 positions, where 24 short answers give ~300.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmkit import PROJECT_ROOT
from slmkit.onnx.session import ModelTokens, model_tokens

TEXT = PROJECT_ROOT / "data" / "fidelity_text.txt"
WINDOW = 256
CONTEXT = 32
# The text is read until answers and text together give this many positions, and no further
# (the `fidelity_positions` param; each costs a float forward pass of the model, minutes for a 3.8B one).
MIN_POSITIONS = 2000

# (token ids, index of the first token to predict): positions first..len-1 are scored.
Sequence = tuple[list[int], int]
Logits = Callable[[list[int]], np.ndarray]


@dataclass(frozen=True)
class Fidelity:
    """Scored positions, the share whose top-1 token is the reference's, and the mean KLD."""

    positions: int
    top1_agreement: float
    kl_divergence: float

    def metrics(self) -> dict[str, float]:
        return {"top1_agreement": self.top1_agreement, "kl_divergence": self.kl_divergence,
                "fidelity_positions": self.positions}  # fmt: skip


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_positions(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position (rows of `[positions, vocab]` logits): top-1 agreement and KL(P_ref || P_candidate)."""
    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return reference.argmax(axis=-1) == candidate.argmax(axis=-1), np.maximum(kl, 0.0)


def text_sequences(token_ids: list[int], window: int = WINDOW, context: int = CONTEXT) -> list[Sequence]:
    """Non-overlapping windows of the text's tokens, each scored after its first `context` tokens."""
    return [(token_ids[start : start + window], context) for start in range(0, len(token_ids) - window + 1, window)]


def scored_rows(sequences: list[Sequence], logits: Logits) -> Iterator[np.ndarray]:
    """Each sequence's logits at its scored positions (position i predicts token i+1), one
    sequence at a time: a reference kept for several candidates is this as a list, and one
    compared once streams, so that only one sequence's rows of each model are held."""
    return (logits(ids)[first - 1 : len(ids) - 1] for ids, first in sequences if first < len(ids))


def fidelity(sequences: list[Sequence], reference: Iterable[np.ndarray], candidate: Logits) -> Fidelity:
    """The candidate teacher-forced along every sequence, against the reference's scored rows."""
    agree, kl = [], []
    for rows, candidate_rows in zip(reference, scored_rows(sequences, candidate), strict=True):
        same, divergence = compare_positions(rows, candidate_rows)
        agree.append(same)
        kl.append(divergence)
    if not agree:
        return Fidelity(0, float("nan"), float("nan"))
    same, divergence = np.concatenate(agree), np.concatenate(kl)
    return Fidelity(int(same.size), float(same.mean()), float(divergence.mean()))


def transformers_logits(model: Any) -> Logits:
    """All positions' logits of a transformers causal LM, in float32."""
    import torch

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    return logits


def onnx_logits(model: Any, tokens_of: ModelTokens) -> Logits:
    """All positions' logits of an onnxruntime-genai model: the sequence appended in one prefill."""
    import onnxruntime_genai as og

    def logits(ids: list[int]) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=tokens_of.max_length(len(ids) + 1))
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(generator.get_output("logits"))[0].astype(np.float32)

    return logits


def answer_sequences(tokenizer: Any, conversations: list[tuple[list[dict[str, str]], str]]) -> list[Sequence]:
    """Each reference answer after its chat prompt, as the pipeline renders it."""
    sequences = []
    for messages, answer in conversations:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        sequences.append((prompt_ids + answer_ids, len(prompt_ids)))
    return sequences


def scored_sequences(tokenizer: Any, conversations: list[tuple[list[dict[str, str]], str]], window: int,
                     min_positions: int = MIN_POSITIONS, text: Path = TEXT) -> list[Sequence]:  # fmt: skip
    """The conversations' answers, then the text's windows until `min_positions` are scored."""
    sequences = answer_sequences(tokenizer, conversations)
    positions = sum(len(ids) - first for ids, first in sequences)
    for ids, first in text_sequences(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"], window):
        if positions >= min_positions:
            break
        sequences.append((ids, first))
        positions += len(ids) - first
    return sequences


def measure_fidelity(reference: Any, tokenizer: Any, onnx_dir: Path, conversations: list[tuple[list[dict[str, str]], str]],
                     min_positions: int = MIN_POSITIONS, text: Path = TEXT) -> Fidelity:  # fmt: skip
    """The ONNX model in `onnx_dir` against `reference`, a transformers causal LM cast to float32
    here (a bf16 checkpoint's weights are exact in float32), on the conversations and the text."""
    reference = reference.float().eval()
    sequences = scored_sequences(tokenizer, conversations, reference_window(reference), min_positions, text)
    return fidelity(sequences, scored_rows(sequences, transformers_logits(reference)), onnx_dir_logits(onnx_dir))


def reference_window(reference: Any) -> int:
    """The text window: WINDOW, or the model's whole context when that is shorter."""
    return min(int(reference.config.max_position_embeddings), WINDOW)


def onnx_dir_logits(onnx_dir: Path) -> Logits:
    from slmkit.onnx.greedy import load

    model, _ = load(onnx_dir)
    return onnx_logits(model, model_tokens(onnx_dir))
