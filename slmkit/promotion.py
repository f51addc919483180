"""The promotion gate and the registry: `candidate` on every new version, `champion` when earned.

`decide` is pure: it compares a candidate's metrics with a floor, with the current champion's
metrics on the same eval set, and, for the ONNX model, with a parity floor. The registry helpers
below it only read and write MLflow's model registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from slmkit.errors import UserError

CANDIDATE = "candidate"
CHAMPION = "champion"
# Quality metrics a new champion must not lose, beyond the tolerance, against the old one.
QUALITY_METRICS = ("answer_correct_rate", "token_f1_mean")
PARITY_METRIC = "exact_match_rate"
# A workspace name (`slm-chat-onnx`) or a Unity Catalog three-level name (`main.models.slm_chat`).
_REGISTERED_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+){0,2}$")


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate; `min_parity` is None for models that are not quantized copies."""

    min_correct_rate: float
    max_regression: float
    min_parity: float | None = None


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return f"{'PASSED' if self.passed else 'FAILED'}: {'; '.join(self.reasons)}"


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    parity: dict[str, float] | None,
    policy: GatePolicy,
) -> GateDecision:
    """Whether `candidate` may become champion, with one reason per check, passed or not."""
    checks: list[tuple[bool, str]] = []
    rate = candidate["answer_correct_rate"]
    checks.append(
        (rate >= policy.min_correct_rate, f"answer_correct_rate {rate:.3f} vs floor {policy.min_correct_rate:.3f}")
    )
    if champion is None:
        checks.append((True, "no champion yet"))
    else:
        for metric in QUALITY_METRICS:
            drop = champion[metric] - candidate[metric]
            checks.append(
                (
                    drop <= policy.max_regression,
                    f"{metric} {candidate[metric]:.3f} vs champion {champion[metric]:.3f} (tolerance {policy.max_regression:.3f})",
                )
            )
    if policy.min_parity is not None:
        if parity is None:
            raise ValueError("the policy has a parity floor but no parity was measured")
        value = parity[PARITY_METRIC]
        checks.append(
            (value >= policy.min_parity, f"parity {PARITY_METRIC} {value:.3f} vs floor {policy.min_parity:.3f}")
        )
    reasons = tuple(f"{'ok' if ok else 'FAIL'} {text}" for ok, text in checks)
    return GateDecision(all(ok for ok, _ in checks), reasons)


def check_registered_name(name: str, parameter: str) -> str:
    """Refuse names the registry would reject or that could escape a path; empty means skip."""
    if name and not _REGISTERED_NAME.match(name):
        raise UserError(
            f"{parameter}={name!r}: use letters, digits, '_' or '-', or catalog.schema.model for Unity Catalog"
        )
    return name


def champion_version(name: str) -> ModelVersion | None:
    """The version the `champion` alias points at, or None when there is none yet."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def register_candidate(model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
    """Register `model_uri` as a new version of `name` and point `candidate` at it."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=tags)
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version.version)
    return version


def promote(name: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
