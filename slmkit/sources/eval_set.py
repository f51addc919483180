"""Eval sets: JSONL rows of chat messages and the answers accepted as correct.

Read here for the `evaluate` step, the calibration rows of `quantization=auto` and the bench;
scored by `slmkit.evaluation.scoring`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmkit import PROJECT_ROOT
from slmkit.chat.contract import ChatRequestError, parse_request
from slmkit.errors import UserError
from slmkit.manifest import file_sha256


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
