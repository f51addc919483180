"""The steps of this project, each declared once: its params, its upstream, its cache key's files.

Everything else that lists steps or params is built from these declarations: each step's
argparse parser, the step cache's keys and order (slmkit.workflow.cache), `main`'s params and order, the
Databricks launcher's step list, and the params a step records on its own run. `MLproject` and
the Databricks job files are written by hand for people to read; tests/test_pipeline.py checks
them against these declarations (same params, same defaults, flags the parsers accept).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from slmkit.batch.spark import ENGINES
from slmkit.errors import check_choice
from slmkit.models.pipeline import TORCH_DTYPES
from slmkit.sources.presets import EXECUTION_PROVIDERS, ONNX_SOURCES

# Tags the steps put on their runs; the MLflow UI and the lookups read them.
STEP_TAG = "slmkit.step"
CACHE_KEY_TAG = "slmkit.cache_key"
SOURCE_KEY_TAG = "slmkit.source_key"
MODEL_URI_TAG = "slmkit.model_uri"
REVISION_TAG = "slmkit.resolved_revision"
DOWNLOAD_RUN_TAG = "slmkit.download_run_id"
MANIFEST_SHA_TAG = "slmkit.manifest_sha256"
OUTPUT_TAG = "slmkit.output"

# What the gate's `min_parity` applies to: the share of answers equal to the pipeline's, or the
# share of positions whose top-1 token is the float model's (slmkit.evaluation.fidelity).
PARITY_METRICS = ("exact_match_rate", "top1_agreement")
# How the steps run their upstream steps (`mlflow run --env-manager`).
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
# MLproject's param types, and how a step parses each from its command line.
_PARSERS = {"string": str, "int": int, "float": float}
# Files every cached step's result depends on, beside its own files and the slmkit library.
SHARED_FILES = ("MLproject", "conda.yaml", "config/presets.yaml")


@dataclass(frozen=True)
class Param:
    """One MLproject param. `affects_result=False` marks params that choose how a step runs, not
    what it produces (env_manager, force): they stay out of the cache key. `choices`, where set,
    are the only values the step's parser takes; MLproject's comments and the docs' table list them.
    """

    name: str
    type: str = "string"
    default: str | int | float = ""
    affects_result: bool = True
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: str) -> str | int | float:
        return _PARSERS[self.type](raw)


@dataclass(frozen=True)
class Step:
    """One entry point.

    `inputs` maps a param to the upstream step whose output fills it when left empty: a
    `download` run id, or the model URI a logging step tagged. `hands_on` is the param name (and
    Databricks task value key) under which later steps receive this step's output. `code` lists
    the project files beside SHARED_FILES and slmkit/ whose content is in the cache key; a step
    without `code` is not cached. What a run of it logs is in its module's docstring (steps/<name>.py).
    """

    name: str
    params: tuple[Param, ...]
    inputs: dict[str, str] = field(default_factory=dict)
    hands_on: str = ""
    code: tuple[str, ...] = ()

    @property
    def cached(self) -> bool:
        return bool(self.code)

    def values(self, given: dict[str, Any]) -> dict[str, str]:
        """This step's params as `mlflow run` strings: the given value, else the declared default
        (`given` may be a parsed command line, `vars(args)`)."""
        return {p.name: str(given.get(p.name, p.default)) for p in self.params}

    def build_parser(self, description: str | None) -> argparse.ArgumentParser:
        """The step's command line: one `--flag-with-dashes` per param, typed, with its default;
        a value outside a param's `choices` is refused as a UserError (one line, before any work)."""
        parser = _StepParser(self, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for param in self.params:
            parser.add_argument(param.flag, dest=param.name, type=param.parse, default=param.default)
        return parser


class _StepParser(argparse.ArgumentParser):
    """argparse's parser, plus the check of every param that has `choices`."""

    def __init__(self, step: Step, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        for param in self.step.params:
            if param.choices:
                check_choice(param.name, getattr(parsed, param.name), param.choices)
        return parsed


MODEL = Param("model", default="phi3-mini-4k")
ENV_MANAGER = Param("env_manager", default="local", affects_result=False, choices=ENV_MANAGERS)
GENERATION = (Param("temperature", "float", 0.0), Param("max_new_tokens", "int", 256))
SOURCE = (MODEL, Param("revision"), Param("allow_pickle", default="false"), Param("chat_template"))
ONNX = (
    Param("execution_provider", default="cpu", choices=EXECUTION_PROVIDERS),
    Param("onnx_source", default="auto", choices=ONNX_SOURCES),
    Param("quantization"),
    Param("calibration_set", default="data/eval_set.jsonl"),
    Param("calibration_rows", "int", 8),
    Param("min_top1_agreement", "float", 0.9),
    Param("tracing", default="true"),
)
EVALUATION = (
    Param("eval_set", default="data/eval_set.jsonl"),
    Param("max_rows", "int", 0),
    Param("max_tokens", "int", 64),
    Param("fidelity_positions", "int", 2000),
    Param("pipeline_registered_model", default="slm-chat-pipeline"),
    Param("onnx_registered_model", default="slm-chat-onnx"),
    Param("min_correct_rate", "float", 0.0),
    Param("max_regression", "float", 0.05),
    Param("min_parity", "float", 0.0),
    Param("parity_metric", default="exact_match_rate", choices=PARITY_METRICS),
    Param("fail_on_gate", default="false"),
)

DOWNLOAD = Step(
    "download",
    SOURCE,
    hands_on="download_run_id",
    code=("steps/download.py",),
)
LOG_PIPELINE = Step(
    "log_pipeline",
    (
        Param("download_run_id"),
        MODEL,
        Param("torch_dtype", default="auto", choices=TORCH_DTYPES),
        *GENERATION,
        ENV_MANAGER,
    ),
    inputs={"download_run_id": "download"},
    hands_on="pipeline_model_uri",
    code=("steps/log_pipeline.py",),
)
LOG_ONNX_WRAPPER = Step(
    "log_onnx_wrapper",
    (MODEL, Param("download_run_id"), *ONNX, *GENERATION, ENV_MANAGER),
    inputs={"download_run_id": "download"},
    hands_on="onnx_model_uri",
    code=("steps/log_onnx_wrapper.py", "wrappers/onnx_chat_model.py"),
)
EVALUATE = Step(
    "evaluate",
    (
        Param("pipeline_model_uri"),
        Param("onnx_model_uri"),
        MODEL,
        *EVALUATION,
        ENV_MANAGER,
        Param("engine", default="local", choices=ENGINES),
    ),
    inputs={"pipeline_model_uri": "log_pipeline", "onnx_model_uri": "log_onnx_wrapper"},
    code=("steps/evaluate.py",),
)
BATCH_INFER = Step(
    "batch_infer",
    (
        Param("model_uri", default="models:/slm-chat-onnx@champion"),
        Param("input"),
        Param("output"),
        Param("max_tokens", "int", 64),
        Param("engine", default="spark", choices=ENGINES),
        Param("partitions", "int", 2),
        Param("concurrency", "int", 0),
    ),
)
CACHED_STEPS = (DOWNLOAD, LOG_PIPELINE, LOG_ONNX_WRAPPER, EVALUATE)


# Params `main` fills itself from the steps before; it does not take them.
_FILLED = {name for declared in CACHED_STEPS for name in declared.inputs}


def _main_params() -> tuple[Param, ...]:
    """`main` takes every param of the steps it chains, but the inputs it fills itself."""
    params: dict[str, Param] = {}
    for declared in CACHED_STEPS:
        params.update({p.name: p for p in declared.params if p.name not in _FILLED and p.name not in params})
    params.pop("engine")  # main evaluates in process; engine=spark is for evaluate run alone
    return (*params.values(), Param("force", default="false", affects_result=False))


MAIN = Step("main", _main_params())
STEPS = {declared.name: declared for declared in (*CACHED_STEPS, BATCH_INFER, MAIN)}
# The order `main` runs the cached steps in, and `force=<step>` reruns from.
ORDER = tuple(declared.name for declared in CACHED_STEPS)
