"""Scoring and timing chat models on an eval set, the same way for every model.

Scorers are small pure functions so the results of both models compare row for row; the
`evaluate` step only loads models, calls `evaluate_model` for each and logs what comes back.
"""

from __future__ import annotations

import json
import math
import statistics
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slmkit import PROJECT_ROOT
from slmkit.chat_format import ChatRequestError, parse_request, response_text
from slmkit.errors import UserError
from slmkit.manifest import file_sha256

# Chat-template markers that must never leak into an answer (Phi-3, ChatML, Llama styles).
TEMPLATE_MARKERS = ("<|", "|>", "<s>", "</s>", "[INST]", "[/INST]")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


@dataclass(frozen=True)
class EvalRow:
    """One eval question: the chat messages and every answer accepted as correct."""

    row_id: str
    messages: list[dict[str, str]]
    answers: list[str]

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def is_artifact_uri(value: str) -> bool:
    """`runs:/…`, `models:/…`, `s3://…` and the like, as opposed to a local path."""
    return "://" in value or value.startswith(("runs:/", "models:/"))


def eval_set_path(value: str) -> Path:
    """A local eval set path; relative paths are taken from the project folder."""
    path = Path(value)
    return path if path.is_absolute() else PROJECT_ROOT / path


def eval_set_digest(value: str) -> str:
    """What identifies the eval set's content for the step cache: a local file's sha256, or
    the URI itself for remote sets (artifact URIs of runs do not change)."""
    if is_artifact_uri(value):
        return f"uri:{value}"
    path = eval_set_path(value)
    return f"sha256:{file_sha256(path)}" if path.is_file() else f"missing:{value}"


def write_eval_set(rows: list[EvalRow], path: Path) -> None:
    """Write rows back as JSONL in the format `load_eval_set` reads."""
    lines = [json.dumps({"id": r.row_id, "messages": r.messages, "answers": r.answers}) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def load_eval_set(path: Path, max_rows: int = 0) -> list[EvalRow]:
    """Read a JSONL eval set: one object per line with `messages` and `answers`.

    Args:
        path: the JSONL file.
        max_rows: keep the first `max_rows` rows; 0 keeps all.

    Raises:
        UserError: the file is missing, empty, or a line lacks a field; the line is named.
    """
    if max_rows < 0:
        raise UserError(f"max_rows={max_rows}: must be >= 0 (0 means all rows)")
    if not path.is_file():
        raise UserError(f"eval_set={str(path)!r}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            parse_request({"messages": raw["messages"]})
            answers = raw["answers"]
        except (json.JSONDecodeError, KeyError, TypeError, ChatRequestError) as error:
            raise UserError(f"{path}:{number}: each line needs valid messages and answers ({error})") from error
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise UserError(f"{path}:{number}: answers must be a non-empty list of strings")
        rows.append(EvalRow(row_id=str(raw.get("id", number)), messages=raw["messages"], answers=answers))
    if not rows:
        raise UserError(f"eval_set={str(path)!r} has no rows")
    return rows[:max_rows] if max_rows else rows


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: 'Paris.' equals 'paris'."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def answer_correct(response: str, answers: list[str]) -> bool:
    """Whether any accepted answer appears in the response as whole words, after normalising."""
    haystack = f" {normalize(response)} "
    return any(f" {normalize(answer)} " in haystack for answer in answers if normalize(answer))


def token_f1(response: str, answers: list[str]) -> float:
    """Token-overlap F1 (SQuAD style) against the best-matching accepted answer."""
    predicted = normalize(response).split()
    best = 0.0
    for answer in answers:
        reference = normalize(answer).split()
        common = sum(min(predicted.count(t), reference.count(t)) for t in set(reference))
        if common:
            precision, recall = common / len(predicted), common / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def well_formed(response: str, finish_reason: str) -> bool:
    """Non-empty text, a known finish reason, and no chat-template markers leaked into it."""
    return (
        bool(response.strip())
        and finish_reason in ("stop", "length")
        and not any(m in response for m in TEMPLATE_MARKERS)
    )


def common_prefix_ratio(a: str, b: str) -> float:
    """Length of the common word prefix over the longer response's length; 1.0 for identical."""
    words_a, words_b = a.split(), b.split()
    longest = max(len(words_a), len(words_b))
    if longest == 0:
        return 1.0
    shared = 0
    for word_a, word_b in zip(words_a, words_b, strict=False):
        if word_a != word_b:
            break
        shared += 1
    return shared / longest


@dataclass(frozen=True)
class RowResult:
    """One model's answer to one row, scored and timed."""

    row_id: str
    answer: str
    finish_reason: str
    correct: bool
    token_f1: float
    well_formed: bool
    latency_s: float
    ttft_s: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time after the first; None when too short to tell."""
        decode_time = self.latency_s - self.ttft_s
        if self.completion_tokens < 2 or decode_time <= 0:
            return None
        return (self.completion_tokens - 1) / decode_time

    @property
    def prompt_tokens_per_s(self) -> float | None:
        """Prompt processing speed: the prompt's tokens over the time to the first token."""
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else None


Predict = Callable[[dict[str, Any]], Any]


def _timed(predict: Predict, request: dict[str, Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    response = predict(request)
    return response, time.perf_counter() - start


def scored(row: EvalRow, response: dict[str, Any], latency_s: float = math.nan, ttft_s: float = math.nan) -> RowResult:
    """One row's ChatCompletion, scored against the row's accepted answers; NaN timings mean
    the answer was not timed (it came from the batch engine)."""
    text = response_text(response)
    finish_reason = response["choices"][0]["finish_reason"]
    return RowResult(
        row_id=row.row_id,
        answer=text,
        finish_reason=finish_reason,
        correct=answer_correct(text, row.answers),
        token_f1=token_f1(text, row.answers),
        well_formed=well_formed(text, finish_reason),
        latency_s=latency_s,
        ttft_s=ttft_s,
        prompt_tokens=int(response["usage"]["prompt_tokens"]),
        completion_tokens=int(response["usage"]["completion_tokens"]),
    )


def evaluate_model(predict: Predict, rows: list[EvalRow], max_tokens: int) -> list[RowResult]:
    """Answer every row greedily and time it, after one warm-up call.

    Time to first token is the latency of the same request capped at one token: it works for
    models that cannot stream, and it is measured the same way for both.
    """
    if max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens}: must be at least 1")
    predict({"messages": rows[0].messages, "max_tokens": 2, "temperature": 0.0})
    results = []
    for row in rows:
        request = {"messages": row.messages, "temperature": 0.0}
        _, ttft = _timed(predict, {**request, "max_tokens": 1})
        response, latency = _timed(predict, {**request, "max_tokens": max_tokens})
        results.append(scored(row, response[0] if isinstance(response, list) else response, latency, ttft))
    return results


def answer_agreement(reference: list[RowResult], other: list[RowResult]) -> float:
    """The share of `reference`'s rows that `other` answered with the same text."""
    answers = {r.row_id: r.answer for r in other}
    return statistics.fmean(answers.get(r.row_id) == r.answer for r in reference)


def with_timings(answered: list[RowResult], timed: list[RowResult]) -> list[RowResult]:
    """Batch-engine answers, each with the in-process timing of its row where it was timed."""
    timings = {r.row_id: (r.latency_s, r.ttft_s) for r in timed}
    return [replace(r, latency_s=timings[r.row_id][0], ttft_s=timings[r.row_id][1]) if r.row_id in timings else r
            for r in answered]  # fmt: skip


def timed_results(results: list[RowResult]) -> list[RowResult]:
    """The rows that were timed in process; batch-engine rows (`evaluate -P engine=spark`) carry
    NaN timings and count only for quality."""
    return [r for r in results if math.isfinite(r.latency_s)]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _median_or_nan(values: list[float | None]) -> float:
    """The median of the rows that could be timed; NaN, not 0.0, when none could: on a model
    whose every answer takes a few milliseconds the decode time is below the timing noise, and a
    0.0 would read as measured."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else math.nan


def summarize(results: list[RowResult]) -> dict[str, float]:
    """Aggregate metrics of one model: quality rates, latency percentiles, median speeds."""
    timed = timed_results(results)
    latencies = [r.latency_s for r in timed]
    return {
        "answer_correct_rate": statistics.fmean(r.correct for r in results),
        "token_f1_mean": statistics.fmean(r.token_f1 for r in results),
        "well_formed_rate": statistics.fmean(r.well_formed for r in results),
        "latency_mean_s": statistics.fmean(latencies),
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "ttft_median_s": statistics.median(r.ttft_s for r in timed),
        "prompt_tokens_per_s_median": _median_or_nan([r.prompt_tokens_per_s for r in timed]),
        "decode_tokens_per_s_median": _median_or_nan([r.decode_tokens_per_s for r in timed]),
        "completion_tokens_mean": statistics.fmean(r.completion_tokens for r in results),
    }


def parity(reference: list[RowResult], candidate: list[RowResult]) -> dict[str, float]:
    """How far the candidate's greedy answers are from the reference's, row for row."""
    pairs = list(zip(reference, candidate, strict=True))
    return {
        "exact_match_rate": statistics.fmean(a.answer.strip() == b.answer.strip() for a, b in pairs),
        "common_prefix_ratio_mean": statistics.fmean(common_prefix_ratio(a.answer, b.answer) for a, b in pairs),
    }


def rows_table(rows: list[EvalRow], results: dict[str, list[RowResult]]) -> dict[str, list[Any]]:
    """A column table of each question and every model's answer, for `mlflow.log_table`."""
    table: dict[str, list[Any]] = {"row_id": [r.row_id for r in rows], "question": [r.question for r in rows]}
    table["accepted_answers"] = [" | ".join(r.answers) for r in rows]
    for model, model_results in results.items():
        for field in ("answer", "correct", "token_f1", "finish_reason", "latency_s", "completion_tokens"):
            table[f"{model}_{field}"] = [asdict(r)[field] for r in model_results]
    return table
