"""The promotion gate and the registry: `candidate` on every new version, `champion` when earned.

`decide` is pure: it compares a candidate's metrics with a floor, with the current champion's
metrics on the same eval set, and, for the ONNX model, with a parity floor. `gate_model` applies
it to one model: the champion's metrics on the same rows, registering, and moving the aliases.
`gate_models` takes every model of an `evaluate` run through it and tags the run with the outcomes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from slmkit.errors import UserError
from slmkit.workflow.lineage import model_run
from slmkit.workflow.steps import DOWNLOAD_RUN_TAG, MANIFEST_SHA_TAG, PARITY_METRICS, REVISION_TAG, SOURCE_KEY_TAG

CANDIDATE = "candidate"
CHAMPION = "champion"
# Quality metrics a new champion must not lose, beyond the tolerance, against the old one.
QUALITY_METRICS = ("answer_correct_rate", "token_f1_mean")
# A registered version's tag naming the rows and settings its `eval.*` tags were measured on.
EVAL_FINGERPRINT_TAG = "eval.fingerprint"
# A workspace name (`slm-chat-onnx`) or a Unity Catalog three-level name (`main.models.slm_chat`).
_REGISTERED_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+){0,2}$")


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate; `min_parity` is None for models that are not quantized copies, and
    applies to `parity_metric`: the answers' exact-match rate, or the fidelity's top-1 agreement."""

    min_correct_rate: float
    max_regression: float
    min_parity: float | None = None
    parity_metric: str = PARITY_METRICS[0]


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
        metric = policy.parity_metric
        value = parity.get(metric, float("nan"))
        checks.append((value >= policy.min_parity, f"parity {metric} {value:.3f} vs floor {policy.min_parity:.3f}"))
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


def served_model_uri(registered_names: list[str], fallback: str) -> str:
    """The model to serve: the first of `registered_names` that has a `champion`, by alias
    (`models:/<name>@champion`, which follows the gate's later decisions); else `fallback`."""
    for name in registered_names:
        if name and champion_version(name) is not None:
            return f"models:/{name}@{CHAMPION}"
    return fallback


def register_candidate(model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
    """Register `model_uri` as a new version of `name` and point `candidate` at it."""
    version = mlflow.register_model(model_uri, name, tags=tags)
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version.version)
    return version


def promote(name: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)


def version_tags(model_uri: str, metrics: dict[str, float], fingerprint: str) -> dict[str, str]:
    """Tags a registered version carries: where it came from and how it scored."""
    tags = model_run(model_uri).data.tags
    lineage = {
        "source_key": tags.get(SOURCE_KEY_TAG, ""),
        "resolved_revision": tags.get(REVISION_TAG, ""),
        "manifest_sha256": tags.get(MANIFEST_SHA_TAG, ""),
        "download_run_id": tags.get(DOWNLOAD_RUN_TAG, ""),
        "git_commit": tags.get("mlflow.source.git.commit", ""),
        EVAL_FINGERPRINT_TAG: fingerprint,
    }
    return {**lineage, **{f"eval.{key}": f"{value:.6g}" for key, value in metrics.items()}}


def champion_quality(
    name: str, fingerprint: str, measure: Callable[[str], dict[str, float]]
) -> tuple[str, dict[str, float]] | None:
    """The champion's version and quality on this eval set: from its tags if it was scored on the
    same rows and settings (`fingerprint`), else `measure(model_uri)` now, so the comparison is
    always like for like; None when there is no champion yet."""
    champion = champion_version(name)
    if champion is None:
        return None
    if champion.tags.get(EVAL_FINGERPRINT_TAG) == fingerprint:
        return champion.version, {m: float(champion.tags[f"eval.{m}"]) for m in QUALITY_METRICS}
    return champion.version, measure(f"models:/{name}@{CHAMPION}")


@dataclass(frozen=True)
class GateOutcome:
    """One model through the gate: the version registered, the decision, the champion it faced."""

    registered: str
    version: str
    decision: GateDecision
    champion: str | None

    def describe(self) -> str:
        text = f"{self.registered} v{self.version} {self.decision.describe()}"
        return text + (f" (compared with champion v{self.champion})" if self.champion else "")


def gate_model(
    registered: str,
    model_uri: str,
    quality: dict[str, float],
    parity: dict[str, float] | None,
    policy: GatePolicy,
    fingerprint: str,
    measure: Callable[[str], dict[str, float]],
) -> GateOutcome:
    """Register `model_uri` as a `candidate` version of `registered` and make it `champion` if
    `decide` passes it against the current champion's quality on the same eval set."""
    champion = champion_quality(registered, fingerprint, measure)
    decision = decide(quality, champion[1] if champion else None, parity, policy)
    version = register_candidate(model_uri, registered, version_tags(model_uri, quality, fingerprint))
    if decision.passed:
        promote(registered, version.version)
    return GateOutcome(registered, version.version, decision, champion[0] if champion else None)


def gate_models(
    registered: dict[str, str],
    model_uris: dict[str, str],
    quality: dict[str, dict[str, float]],
    parity: dict[str, float],
    policies: dict[str, GatePolicy],
    fingerprint: str,
    measure: Callable[[str], dict[str, float]],
) -> dict[str, GateOutcome]:
    """Every model with a registry name through `gate_model`, in `model_uris`' order; the
    outcomes are tagged on the active run as `gate.<model>` and `gate.<model>.passed`.

    Parity applies to the ONNX model alone: it is measured against the pipeline's answers.
    """
    outcomes = {
        name: gate_model(
            registered[name],
            uri,
            quality[name],
            parity if name == "onnx" else None,
            policies[name],
            fingerprint,
            measure,
        )
        for name, uri in model_uris.items()
        if registered[name]
    }
    for name, outcome in outcomes.items():
        mlflow.set_tags(
            {f"gate.{name}": outcome.describe()[:5000], f"gate.{name}.passed": str(outcome.decision.passed).lower()}
        )
    return outcomes


def check_gates(outcomes: dict[str, GateOutcome], fail_on_gate: bool) -> None:
    """With `fail_on_gate`, a failed gate is the run's failure (CI-style); otherwise only its tags say so."""
    failed = [name for name, outcome in outcomes.items() if not outcome.decision.passed]
    if fail_on_gate and failed:
        raise UserError(f"promotion gate failed for {', '.join(failed)} and fail_on_gate=true; see the gate.* tags")
