"""The steps of this project, each declared once: its params, its upstream, its cache key's files.

Everything else that lists steps or params is built from these declarations: each step's
argparse parser, the step cache's keys and order (slmkit.cache), `main`'s params and order, the
Databricks launcher's step list, and the params a step records on its own run. `MLproject` and
the Databricks job files are written by hand for people to read; tests/test_pipeline.py checks
them against these declarations (same params, same defaults, flags the parsers accept).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

# Tags the steps put on their runs; the MLflow UI and the lookups read them.
STEP_TAG = "slmkit.step"
CACHE_KEY_TAG = "slmkit.cache_key"
SOURCE_KEY_TAG = "slmkit.source_key"
MODEL_URI_TAG = "slmkit.model_uri"
REVISION_TAG = "slmkit.resolved_revision"
DOWNLOAD_RUN_TAG = "slmkit.download_run_id"
MANIFEST_SHA_TAG = "slmkit.manifest_sha256"
OUTPUT_TAG = "slmkit.output"
LINEAGE_TAGS = (SOURCE_KEY_TAG, REVISION_TAG, MANIFEST_SHA_TAG, DOWNLOAD_RUN_TAG)

# MLproject's param types, and how a step parses each from its command line.
_PARSERS = {"string": str, "int": int, "float": float}
# Files every cached step's result depends on, beside its own files and the slmkit library.
SHARED_FILES = ("MLproject", "conda.yaml", "config/presets.yaml")


@dataclass(frozen=True)
class Param:
    """One MLproject param. `affects_result=False` marks params that choose how a step runs, not
    what it produces (env_manager, force): they stay out of the cache key."""

    name: str
    type: str = "string"
    default: str | int | float = ""
    affects_result: bool = True

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
    without `code` is not cached. `tags` and `artifacts` say what a run of it leaves behind.
    """

    name: str
    params: tuple[Param, ...]
    inputs: dict[str, str] = field(default_factory=dict)
    hands_on: str = ""
    code: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()

    @property
    def cached(self) -> bool:
        return bool(self.code)

    def values(self, given: dict[str, Any]) -> dict[str, str]:
        """This step's params as `mlflow run` strings: the given value, else the declared default
        (`given` may be a parsed command line, `vars(args)`)."""
        return {p.name: str(given.get(p.name, p.default)) for p in self.params}

    def build_parser(self, description: str | None) -> argparse.ArgumentParser:
        """The step's command line: one `--flag-with-dashes` per param, typed, with its default."""
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for param in self.params:
            parser.add_argument(param.flag, dest=param.name, type=param.parse, default=param.default)
        return parser


MODEL = Param("model", default="phi3-mini-4k")
ENV_MANAGER = Param("env_manager", default="local", affects_result=False)
GENERATION = (Param("temperature", "float", 0.0), Param("max_new_tokens", "int", 256))
SOURCE = (MODEL, Param("revision"), Param("allow_pickle", default="false"))
ONNX = (
    Param("execution_provider", default="cpu"),
    Param("onnx_source", default="auto"),
    Param("quantization"),
    Param("calibration_set", default="data/eval_set.jsonl"),
    Param("calibration_rows", "int", 8),
    Param("max_quality_drop", "float", 0.05),
    Param("tracing", default="true"),
)
EVALUATION = (
    Param("eval_set", default="data/eval_set.jsonl"),
    Param("max_rows", "int", 0),
    Param("max_tokens", "int", 64),
    Param("pipeline_registered_model", default="slm-chat-pipeline"),
    Param("onnx_registered_model", default="slm-chat-onnx"),
    Param("min_correct_rate", "float", 0.0),
    Param("max_regression", "float", 0.05),
    Param("min_parity", "float", 0.0),
    Param("fail_on_gate", default="false"),
)

DOWNLOAD = Step(
    "download",
    SOURCE,
    hands_on="download_run_id",
    code=("steps/download.py",),
    tags=(STEP_TAG, CACHE_KEY_TAG, SOURCE_KEY_TAG, REVISION_TAG, MANIFEST_SHA_TAG),
    artifacts=("checkpoint/", "gguf/", "manifest.json"),
)
LOG_PIPELINE = Step(
    "log_pipeline",
    (Param("download_run_id"), MODEL, Param("torch_dtype", default="auto"), *GENERATION, ENV_MANAGER),
    inputs={"download_run_id": "download"},
    hands_on="pipeline_model_uri",
    code=("steps/log_pipeline.py",),
    tags=(STEP_TAG, CACHE_KEY_TAG, *LINEAGE_TAGS, MODEL_URI_TAG),
    artifacts=("model/",),
)
LOG_ONNX_WRAPPER = Step(
    "log_onnx_wrapper",
    (MODEL, Param("download_run_id"), *ONNX, *GENERATION, ENV_MANAGER),
    inputs={"download_run_id": "download"},
    hands_on="onnx_model_uri",
    code=("steps/log_onnx_wrapper.py", "wrappers/onnx_chat_model.py"),
    tags=(STEP_TAG, CACHE_KEY_TAG, *LINEAGE_TAGS, MODEL_URI_TAG),
    artifacts=("model/", "gguf_tensors.tsv", "quantization_candidates.json"),
)
EVALUATE = Step(
    "evaluate",
    (
        Param("pipeline_model_uri"),
        Param("onnx_model_uri"),
        MODEL,
        *EVALUATION,
        ENV_MANAGER,
        Param("engine", default="local"),
    ),
    inputs={"pipeline_model_uri": "log_pipeline", "onnx_model_uri": "log_onnx_wrapper"},
    code=("steps/evaluate.py",),
    tags=(STEP_TAG, CACHE_KEY_TAG, "gate.pipeline", "gate.onnx"),
    artifacts=("eval_results.json", "comparison.md", "plots/latency.png", "plots/overview.png"),
)
BATCH_INFER = Step(
    "batch_infer",
    (
        Param("model_uri", default="models:/slm-chat-onnx@champion"),
        Param("input"),
        Param("output"),
        Param("max_tokens", "int", 64),
        Param("engine", default="spark"),
        Param("partitions", "int", 2),
        Param("concurrency", "int", 0),
    ),
    tags=(STEP_TAG, OUTPUT_TAG),
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


MAIN = Step("main", _main_params(), tags=(STEP_TAG, "cache.<step>"), artifacts=("summary.txt",))
STEPS = {declared.name: declared for declared in (*CACHED_STEPS, BATCH_INFER, MAIN)}
# The order `main` runs the cached steps in, and `force=<step>` reruns from.
ORDER = tuple(declared.name for declared in CACHED_STEPS)
