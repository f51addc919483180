"""`quantization=auto`: the smallest ONNX build that keeps the float model's next-token choices.

Candidates are tried from the smallest expected size up. Each is built, then teacher-forced along
the source's own greedy answers to the calibration rows and the shipped text
(slmkit.evaluation.fidelity, the way llama-perplexity measures a quantization): the first whose
top-1 agreement with transformers in float32 reaches `min_top1_agreement` is kept, and no larger
one is built. Thousands of positions tell builds apart where a few dozen answers cannot (one of
24 rows is 4 points of correct rate). Each candidate's greedy answers and decode speed are
recorded beside it. A candidate that fails to build or to load is skipped with its reason. If
none is good enough, the one with the best agreement is kept, and the table says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError
from slmkit.evaluation.fidelity import (
    Sequence,
    fidelity,
    onnx_dir_logits,
    reference_window,
    scored_rows,
    scored_sequences,
    transformers_logits,
)
from slmkit.evaluation.scoring import answer_correct
from slmkit.manifest import folder_bytes
from slmkit.onnx.build import QUANTIZATIONS, build_onnx
from slmkit.onnx.gguf_carry import CarryReport
from slmkit.sources.checkpoint import float_model, gguf_bits_per_weight
from slmkit.sources.eval_set import EvalRow

# Bits a weight takes in each build, scales included (block 32, float32 scales), to order them.
BITS_PER_WEIGHT = {"int4": 5.0, "int4-kquant": 6.0, "int8": 9.0, "fp16": 16.0, "bf16": 16.0, "fp32": 32.0}


@dataclass(frozen=True)
class Candidate:
    """What one tried build measured, or why it was skipped."""

    quantization: str
    size_bytes: int = 0
    top1_agreement: float = 0.0
    kl_divergence: float = 0.0
    correct_rate: float = 0.0
    exact_match_rate: float = 0.0
    decode_tokens_per_s: float = 0.0
    skipped: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def candidate_order(execution_provider: str, gguf_bits_per_weight: float | None) -> list[str]:
    """Quantizations the provider runs, smallest first; `gguf` sits by its file's own size."""
    sizes = {q: bits for q, bits in BITS_PER_WEIGHT.items() if execution_provider in QUANTIZATIONS[q].providers}
    if gguf_bits_per_weight is not None and execution_provider in QUANTIZATIONS["gguf"].providers:
        sizes["gguf"] = gguf_bits_per_weight
    return sorted(sizes, key=lambda q: sizes[q])


@dataclass(frozen=True)
class AutoChoice:
    """What `quantization=auto` kept, in which folder, and every candidate it tried."""

    kept: Candidate
    tried: list[Candidate]
    reference_correct_rate: float
    fidelity_positions: int
    folder: Path
    report: CarryReport | None


def good_enough(candidate: Candidate, min_top1_agreement: float) -> bool:
    return not candidate.skipped and candidate.top1_agreement >= min_top1_agreement - 1e-9


def choose(
    order: list[str], measure: Callable[[str], Candidate], min_top1_agreement: float
) -> tuple[Candidate | None, list[Candidate]]:
    """Measure candidates in `order` until one is good enough; return the kept one and all tried.

    The kept one is the first good enough, else the built one with the best top-1 agreement (the
    smaller on ties), else None when nothing built.
    """
    tried = []
    for quantization in order:
        candidate = measure(quantization)
        tried.append(candidate)
        if good_enough(candidate, min_top1_agreement):
            return candidate, tried
    built = [c for c in tried if not c.skipped]
    return (max(built, key=lambda c: c.top1_agreement) if built else None), tried


def score_answers(answers: list[str], reference: list[str], rows: list[EvalRow]) -> tuple[float, float]:
    """(answer-correct rate, exact-match rate against the reference answers)."""
    correct = statistics.fmean(answer_correct(a, row.answers) for a, row in zip(answers, rows, strict=True))
    exact = statistics.fmean(a.strip() == b.strip() for a, b in zip(answers, reference, strict=True))
    return correct, exact


def reference_answers(model: Any, tokenizer: Any, rows: list[EvalRow], max_tokens: int) -> list[str]:
    """The source's own greedy answers: transformers on the float checkpoint, in float32."""
    import torch

    answers = []
    with torch.inference_mode():
        for row in rows:
            inputs = tokenizer.apply_chat_template(
                row.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
            answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def float_reference(checkpoint: Path, gguf: Path | None = None) -> tuple[Any, Any]:
    """transformers' model (float32, eval mode) and tokenizer of the checkpoint, its weights the
    GGUF file's for a GGUF source."""
    import torch
    from transformers import AutoTokenizer

    model = float_model(checkpoint, gguf, torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


@dataclass(frozen=True)
class Calibration:
    """What every candidate is measured against: the rows, the source's greedy answers to them and
    its correct rate, and the scored sequences with the float model's logits along them."""

    rows: list[EvalRow]
    answers: list[str]
    correct_rate: float
    sequences: list[Sequence]
    reference_rows: list[np.ndarray]

    @property
    def positions(self) -> int:
        return sum(len(rows) for rows in self.reference_rows)


def calibrate(
    checkpoint: Path, gguf: Path | None, rows: list[EvalRow], max_tokens: int, min_positions: int
) -> Calibration:
    """Run the float model once: its answers, and its logits along them and the shipped text."""
    model, tokenizer = float_reference(checkpoint, gguf)
    answers = reference_answers(model, tokenizer, rows, max_tokens)
    correct, _ = score_answers(answers, answers, rows)
    conversations = [(row.messages, answer) for row, answer in zip(rows, answers, strict=True)]
    sequences = scored_sequences(tokenizer, conversations, reference_window(model), min_positions)
    reference_rows = list(scored_rows(sequences, transformers_logits(model)))
    return Calibration(rows, answers, correct, sequences, reference_rows)


def onnx_answers(folder: Path, rows: list[EvalRow], max_tokens: int) -> tuple[list[str], float]:
    """Greedy answers of an ONNX build (bare onnxruntime-genai loop) and its decode tokens/s."""
    from slmkit.onnx.greedy import bare_greedy, load
    from slmkit.onnx.session import model_tokens

    model, tokenizer = load(folder)
    tokens_of = model_tokens(folder)
    answers, tokens, seconds = [], 0, 0.0
    for row in rows:
        started = time.perf_counter()
        generated, _ = bare_greedy(model, tokenizer, row.messages, max_tokens, tokens_of)
        seconds += time.perf_counter() - started
        tokens += len(generated)
        answers.append(tokenizer.decode(generated))
    return answers, tokens / seconds if seconds else 0.0


def measure_candidate(folder: Path, calibration: Calibration, max_tokens: int) -> dict[str, float]:
    """A built candidate's fidelity along the calibration's sequences, and its greedy answers' scores."""
    scored = fidelity(calibration.sequences, calibration.reference_rows, onnx_dir_logits(folder))
    answers, speed = onnx_answers(folder, calibration.rows, max_tokens)
    correct, exact = score_answers(answers, calibration.answers, calibration.rows)
    return {"top1_agreement": scored.top1_agreement, "kl_divergence": scored.kl_divergence,
            "correct_rate": correct, "exact_match_rate": exact, "decode_tokens_per_s": speed}  # fmt: skip


def auto_quantization(
    checkpoint: Path,
    gguf: Path | None,
    scratch: Path,
    execution_provider: str,
    calibration: Calibration,
    min_top1_agreement: float,
    max_tokens: int,
) -> AutoChoice:
    """Build candidates smallest first (into `scratch`) and keep the first whose top-1 agreement
    with the float model reaches `min_top1_agreement`; see the module docstring.

    Raises:
        UserError: no candidate could be built; the message gives each one's reason.
    """
    builds: dict[str, tuple[Path, CarryReport | None]] = {}

    def measure(quantization: str) -> Candidate:
        folder = scratch / f"candidate-{quantization}"
        try:
            report = build_onnx(quantization, checkpoint, folder, scratch, execution_provider, gguf)
            measured = measure_candidate(folder, calibration, max_tokens)
        except Exception as error:  # a candidate that fails to build or load is skipped, not fatal
            reason = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
            return Candidate(quantization, skipped=reason)
        builds[quantization] = folder, report
        return Candidate(quantization, folder_bytes(folder), **measured)

    gguf_bits = gguf_bits_per_weight(gguf) if gguf else None
    kept, tried = choose(candidate_order(execution_provider, gguf_bits), measure, min_top1_agreement)
    if kept is None:
        raise UserError(f"quantization=auto: no candidate could be built ({'; '.join(c.skipped for c in tried)})")
    return AutoChoice(kept, tried, calibration.correct_rate, calibration.positions, *builds[kept.quantization])
