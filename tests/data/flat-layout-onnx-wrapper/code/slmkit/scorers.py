"""MLflow GenAI code scorers over the pure scoring functions of slmkit.evaluation.

`outputs` is `{"content": str, "finish_reason": str}` and `expectations` is
`{"answers": [str, ...]}`; no network and no judge model are needed.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.genai.scorers import scorer

from slmkit import evaluation
from slmkit.lineage import run_name
from slmkit.pipeline import STEP_TAG
from slmkit.tracking_server import bound_trace_writers


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


def record_scores(name: str, rows: list[evaluation.EvalRow], results: list[evaluation.RowResult]) -> None:
    """Record answers already produced and scored in a nested run `evaluate · <name>`: one trace
    per row with one assessment per scorer, for reading row by row in the MLflow UI.

    The step's metrics come from slmkit.evaluation alone; the `<scorer>/mean` metrics that
    `mlflow.genai.evaluate` puts on this nested run are its own and not copied to the step's run.

    Trace writers are bounded to the store's connection pool, and the async trace queue is
    flushed before the run ends, so every row's trace and assessments are in the store.
    """
    bound_trace_writers()
    data = [
        {
            "inputs": {"messages": row.messages},
            "outputs": {"content": result.answer, "finish_reason": result.finish_reason},
            "expectations": {"answers": row.answers},
        }
        for row, result in zip(rows, results, strict=True)
    ]
    with mlflow.start_run(run_name=run_name("evaluate", name), nested=True):
        mlflow.set_tag(STEP_TAG, "evaluate.scores")
        mlflow.genai.evaluate(data=data, scorers=SCORERS)
        mlflow.flush_trace_async_logging()
