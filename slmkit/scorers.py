"""MLflow GenAI code scorers over the pure scoring functions of slmkit.evaluation.

`outputs` is `{"content": str, "finish_reason": str}` and `expectations` is
`{"answers": [str, ...]}`; no network and no judge model are needed.
"""

from __future__ import annotations

from typing import Any

from mlflow.genai.scorers import scorer

from slmkit import evaluation


@scorer
def answer_correct(outputs: dict[str, Any], expectations: dict[str, Any]) -> bool:
    """Any accepted answer found in the response, normalised for case and punctuation."""
    return evaluation.answer_correct(outputs["content"], expectations["answers"])


@scorer
def token_f1(outputs: dict[str, Any], expectations: dict[str, Any]) -> float:
    """Token F1 against the best-matching accepted answer."""
    return evaluation.token_f1(outputs["content"], expectations["answers"])


@scorer
def well_formed(outputs: dict[str, Any]) -> bool:
    """Non-empty, a known finish reason, and no chat-template tokens leaked into the text."""
    return evaluation.well_formed(outputs["content"], outputs["finish_reason"])


SCORERS = [answer_correct, token_f1, well_formed]
