"""Shared fixtures: tiny models built once per session, and a real MLflow tracking server."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from harness.servers import free_port, stop_process, wait_for_http
from slmkit import PROJECT_ROOT
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT, seal_onnx_folder, wrapper_model_arguments
from slmkit.onnx.behaviour_cache import BEHAVIOUR_CACHE_ENV
from slmkit.onnx.build import build_onnx
from slmkit.onnx.session import THREADS_ENV
from slmkit.sources.eval_set import load_eval_set
from slmkit.workflow.steps import MODEL_URI_TAG, ORDER, STEP_TAG, STEPS
from tests.tiny_models import build_tiny_phi3, train_tiny_phi3

BIN = Path(sys.executable).parent
# Every `mlflow run` in the tests carries this token; tests/test_reliability.py greps for it.
HF_TOKEN_CANARY = "hf_canaryTOKEN0123456789abcdefSECRET"


# Fixtures that start a process (the int4 builder, `mlflow server`, `mlflow run`): a test using
# one is marked `integration`, so `make test-fast` (-m "not integration") starts no process.
PROCESS_FIXTURES = frozenset({"tracking_server", "wrapper_dir", "wrapper", "pipeline_run", "untrained_mains", "built"})


# `make test` spreads the suite over the cores (pytest-xdist, --dist loadgroup). Each worker has
# its own tracking server, so the tests that share pipeline_run's store and its experiments' step
# cache run on one worker, as one group (model folders are shared through `built_once` instead).
XDIST_GROUP_OF_FIXTURE = {"pipeline_run": "tiny-e2e"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        for group in {group for fixture, group in XDIST_GROUP_OF_FIXTURE.items() if fixture in item.fixturenames}:
            item.add_marker(pytest.mark.xdist_group(group))
    # xdist hands out the biggest group first, then single tests in this order: the `slow` ones,
    # longest first, so that none starts last and leaves the other worker idle; then the others
    # that start a process; then the rest, seconds each, which fill the gaps at the end.
    items.sort(key=start_order)


def start_order(item: pytest.Item) -> tuple[int, float]:
    slow = item.get_closest_marker("slow")
    if slow:
        return 0, -slow.kwargs["seconds"]
    return (1 if item.get_closest_marker("integration") else 2), 0.0


def use_experiment(experiment_id: str) -> None:
    """Make an experiment active in this process only: `set_experiment` also exports
    MLFLOW_EXPERIMENT_ID, which a child `mlflow run --experiment-name` refuses beside its own."""
    mlflow.set_experiment(experiment_id=experiment_id)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@dataclass
class TrackingServer:
    """A real `mlflow server` on 127.0.0.1, which a fault test may stop and start again on the
    same port and store."""

    uri: str
    root: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = start_tracking_server(self.root, int(self.uri.rsplit(":", 1)[1]))

    def stop(self) -> None:
        # Traces this process still has queued for the server go first: queued past its stop,
        # they would be retried for minutes.
        mlflow.flush_trace_async_logging()
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def stored(self, artifact_uri: str) -> Path:
        """Where the artifacts at `artifact_uri` are on disk: under this server's root for
        mlflow-artifacts:/…, the path itself for an experiment's file:// location. Tests read
        them there instead of downloading hundreds of MB over HTTP again."""
        if artifact_uri.startswith("file://"):
            return Path(urllib.parse.urlparse(artifact_uri).path)
        return self.root / "artifacts" / artifact_uri.removeprefix("mlflow-artifacts:/")

    def stored_model(self, step_run: Run) -> Path:
        """The folder of the model a logging step's run logged, on disk, served and read in place."""
        model_id = step_run.data.tags[MODEL_URI_TAG].removeprefix("models:/")
        return self.stored(mlflow.get_logged_model(model_id).artifact_location)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a user's shell would have: venv first on PATH, this server's URI."""
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": self.uri,
            "HF_HUB_OFFLINE": "1",
            "HF_TOKEN": HF_TOKEN_CANARY,
            **extra,
        }


def start_tracking_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`: SQLite store and artifact root under `root`, so a
    server started again on the same `root` has everything the stopped one had."""
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    # Without MLflow's job runner: seven huey consumers that each import mlflow (~20 s of CPU per
    # start on 2 cores) for server-side jobs (scheduled scorers, prompt optimization) that
    # nothing here submits.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (root / "server.log").open("a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout_s=60)
    return process


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """`mlflow server` on 127.0.0.1: SQLite backend, artifacts served through the server."""
    server = TrackingServer(uri=f"http://127.0.0.1:{free_port()}", root=tmp_path_factory.mktemp("tracking"))
    server.start()
    try:
        mlflow.set_tracking_uri(server.uri)
        use_experiment("0")  # the server's Default experiment
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """TMPDIR and the kept batch behaviours, for this process and every process a test starts,
    under pytest's basetemp: what a killed process or a library leaves there goes when a passing
    session removes basetemp (pyproject's tmp_path_retention_policy), instead of filling /tmp run
    after run."""
    temporary = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(temporary))
        patch.setattr(tempfile, "tempdir", str(temporary))
        # Measured batch behaviours stay in the session too, not in the user's ~/.cache.
        patch.setenv(BEHAVIOUR_CACHE_ENV, str(tmp_path_factory.mktemp("batch-behaviour")))
        yield


# Set for every process a test starts (one_intra_op_thread_per_process); bare environments add them.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", THREADS_ENV: "1"}


def bare_env(home: Path) -> dict[str, str]:
    """A bare environment with the hub unreachable: nothing the model needs may come from it.
    Its temporary files go to `home`/tmp, where a test can see what a server left behind. It
    keeps the suite's one intra-op thread per process (conftest)."""
    (home / "tmp").mkdir(exist_ok=True)
    return {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(home / "tmp"),
        **ONE_THREAD_ENV,
    }


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread_per_process() -> Iterator[None]:
    """One torch (OpenMP) and one onnxruntime intra-op thread in every process a test starts.
    `make test` runs a worker per core, so a second thread per process only spins beside the
    other worker's processes: a tiny served model took 73 ms of CPU a request against 45, the
    tiny pipeline's measurement 7.5 s against 6.4 with the other core busy. The default, a
    thread per CPU, is what `make run` and `make bench` use (its choice: test_onnx_build)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ONE_THREAD_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session", autouse=True)
def local_tracking_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep runs, traces and their artifacts of tests that use no server out of the project folder."""
    store = tmp_path_factory.mktemp("local-store")
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    use_experiment(mlflow.create_experiment("tests", artifact_location=str(store / "artifacts")))


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` once per `make test`, by whichever xdist worker asks first while the others
    wait: the tiny models and model folders are the same files for every worker, and each build
    costs seconds of CPU that the other worker's tests lack. Tests only read these folders."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that died midway left
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Phi-3 checkpoint folder."""
    return built_once(tmp_path_factory, "tiny-phi3", build_tiny_phi3)


TRAINED_ROWS = 3


def build_trained_tiny_phi3(folder: Path) -> Path:
    rows = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=TRAINED_ROWS)
    return train_tiny_phi3(build_tiny_phi3(folder), [(row.messages, f"{row.answers[0]}.") for row in rows], steps=200)


@pytest.fixture(scope="session")
def trained_tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Phi-3 overfit to answer the first eval rows correctly, so quality is measurable."""
    return built_once(tmp_path_factory, "trained-phi3", build_trained_tiny_phi3)


def project_params(*params: str) -> list[str]:
    """`-P name=value` flags for `mlflow run`, one pair per "name=value"."""
    return [arg for param in params for arg in ("-P", param)]


def mlflow_run_command(*args: str) -> list[str]:
    """The `mlflow run` command line a user types for this project."""
    return [str(BIN / "mlflow"), "run", str(PROJECT_ROOT), "--env-manager", "local", *args]


def mlflow_run(server: TrackingServer, *args: str, timeout_s: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`mlflow run` of this project, as a user types it, against `server`."""
    return subprocess.run(
        mlflow_run_command(*args),
        env=server.env(**env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def step_flags(step: str, *params: str) -> list[str]:
    """The step's command-line flags for "name=value" params, as MLproject's command passes them
    (slmkit.workflow.steps's declaration); a name the step does not declare is a KeyError."""
    declared = {param.name: param for param in STEPS[step].params}
    return [arg for name, value in (param.split("=", 1) for param in params) for arg in (declared[name].flag, value)]


def step_module_command(step: str, *params: str) -> list[str]:
    """`python -m steps.<step>` with "name=value" params as flags, run from the project root."""
    return [sys.executable, "-m", f"steps.{step}", *step_flags(step, *params)]


def run_step_module(
    server: TrackingServer, experiment: str, step: str, *params: str, project: Path = PROJECT_ROOT, **env: str
) -> subprocess.CompletedProcess:
    """`python -m steps.<step>`, the command MLproject gives the entry point, run in this project
    (or a copy of it) into `experiment`, with "name=value" params as `mlflow run -P` takes them.
    For tests of a step's own work, not of `mlflow run`, whose CLI costs ~3.5 s of CPU to start."""
    return subprocess.run(
        step_module_command(step, *params),
        env=server.env(MLFLOW_EXPERIMENT_NAME=experiment, **env),
        cwd=project, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def run_step_in_process(experiment: str, step: str, *params: str) -> Run:
    """The step's own `main`, called in this process with the args its command line parses from
    the same flags, its run put in `experiment`; the session's Default experiment is active again
    after. For a matrix of step runs whose subject is each run's work: a process per step would
    cost ~2 s of CPU in imports alone. `run_cli`'s frame (one-line errors, SIGTERM) is not used."""
    module = importlib.import_module(f"steps.{step}")
    args = STEPS[step].build_parser(module.__doc__).parse_args(step_flags(step, *params))
    use_experiment(mlflow.set_experiment(experiment).experiment_id)
    try:
        module.main(args)
    finally:
        use_experiment("0")
    run = mlflow.last_active_run()
    assert run is not None
    assert run.data.tags[STEP_TAG] == step
    return run


@dataclass(frozen=True)
class PipelineRun:
    """One finished `mlflow run .` (entry point main) and its child runs by step."""

    parent: Run
    children: dict[str, Run]
    output: str

    def model_uri(self, step: str) -> str:
        return self.children[step].data.tags[MODEL_URI_TAG]


def runs_of(experiment_name: str) -> list[Run]:
    """All runs of an experiment, oldest first."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return mlflow.search_runs([experiment.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])


def cache_notes(parent: Run) -> dict[str, str]:
    """'ran' or 'reused' per step, from the main run's `cache.<step>` tags."""
    return {step: parent.data.tags[f"cache.{step}"].split(" ")[0] for step in ORDER}


def run_main(server: TrackingServer, experiment: str, *params: str, **env: str) -> PipelineRun:
    """`mlflow run .` with `-P` overrides (and `env`); returns the newest main run of `experiment`."""
    return newest_main(experiment, mlflow_run(server, "--experiment-name", experiment, *project_params(*params), **env))


def run_main_module(server: TrackingServer, experiment: str, *params: str) -> PipelineRun:
    """`python -m steps.main` with "name=value" params, for tests of main's own work (see run_step_module)."""
    return newest_main(experiment, run_step_module(server, experiment, "main", *params))


def newest_main(experiment: str, result: subprocess.CompletedProcess) -> PipelineRun:
    """The newest main run of `experiment` and its children, once `result`, a main, succeeded."""
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(experiment)
    parent = [r for r in runs if r.data.tags.get(STEP_TAG) == "main"][-1]
    children = {r.data.tags[STEP_TAG]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return PipelineRun(parent, children, result.stdout + result.stderr)


# Tests that build from the trained tiny Phi-3 log into `pipeline_run`'s experiment, and those
# that run `main` on the untrained one share another, so the step cache reuses their builds.
TRAINED_EXPERIMENT = "e2e-tiny"
UNTRAINED_EXPERIMENT = "e2e-untrained"
E2E_REGISTERED = ("pipeline_registered_model=e2e-pipeline", "onnx_registered_model=e2e-onnx")
E2E_NAMES = ("e2e-pipeline", "e2e-onnx")


@pytest.fixture(scope="session")
def main_temporary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pipeline_run`'s TMPDIR, where a test sees what the whole pipeline left behind."""
    return tmp_path_factory.mktemp("main-tmp")


@pytest.fixture(scope="session")
def pipeline_run(tracking_server: TrackingServer, trained_tiny_phi3: Path, main_temporary: Path) -> PipelineRun:
    """`main` on the trained tiny Phi-3, registering into `e2e-pipeline` and `e2e-onnx`."""
    return run_main(
        tracking_server,
        TRAINED_EXPERIMENT,
        f"model={trained_tiny_phi3}",
        f"max_rows={TRAINED_ROWS}",
        "max_tokens=8",
        *E2E_REGISTERED,
        TMPDIR=str(main_temporary),
    )


@dataclass(frozen=True)
class ConcurrentMains:
    """Two `main`s started at the same moment, and what the store holds once both have ended."""

    returncodes: list[int]
    outputs: list[str]
    runs: list[Run]  # the experiment's runs started since, oldest first
    new_versions: dict[str, int]  # model versions registered meanwhile, per registered name

    @property
    def parents(self) -> list[Run]:
        return [r for r in self.runs if r.data.tags.get(STEP_TAG) == "main"]

    def used(self, step: str) -> set[str]:
        """The run ids of `step` the two mains recorded (one, if neither did the work twice)."""
        return {parent.data.params[f"{step}_run_id"] for parent in self.parents}

    def output_of(self, run_id: str) -> str:
        """The output of the main that printed `run_id`."""
        return next(output for output in self.outputs if run_id in output)


@pytest.fixture(scope="session")
def untrained_mains(
    pipeline_run: PipelineRun,
    tracking_server: TrackingServer,
    tiny_phi3: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ConcurrentMains:
    """Two `main`s of the untrained tiny Phi-3 started at once into UNTRAINED_EXPERIMENT and
    registering into `pipeline_run`'s models, whose champion is the trained tiny Phi-3.

    One pair of runs serves two tests: each step done once under the race (test_reruns), and a
    worse candidate that the gate keeps from `champion` (test_evaluate_gate). Later `main`s of
    this model in the experiment reuse its builds. They run as `python -m steps.main`, the race
    being main's own; `pipeline_run` is the main that `mlflow run` starts.
    """
    # Without fidelity (fidelity_positions=0): the gate compares answers; pipeline_run measures it.
    params = (f"model={tiny_phi3}", f"max_rows={TRAINED_ROWS}", "max_tokens=8", "fidelity_positions=0", *E2E_REGISTERED)
    env = tracking_server.env(
        MLFLOW_EXPERIMENT_NAME=UNTRAINED_EXPERIMENT, SLMKIT_LOCK_DIR=str(tmp_path_factory.mktemp("locks"))
    )
    client = MlflowClient()
    versions_before = {name: len(client.search_model_versions(f"name='{name}'")) for name in E2E_NAMES}
    # Two mains racing to create the same experiment is MLflow's own race (one gets
    # RESOURCE_ALREADY_EXISTS); scheduled runs log to an existing experiment.
    if mlflow.get_experiment_by_name(UNTRAINED_EXPERIMENT) is None:
        mlflow.create_experiment(UNTRAINED_EXPERIMENT)
    runs_before = {run.info.run_id for run in runs_of(UNTRAINED_EXPERIMENT)}
    command = step_module_command("main", *params)
    both = [
        subprocess.Popen(
            command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in both]
    return ConcurrentMains(
        returncodes=[process.returncode for process in both],
        outputs=outputs,
        runs=[run for run in runs_of(UNTRAINED_EXPERIMENT) if run.info.run_id not in runs_before],
        new_versions={
            name: len(client.search_model_versions(f"name='{name}'")) - versions_before[name] for name in E2E_NAMES
        },
    )


GREEDY_DEFAULTS = {"do_sample": False, "max_new_tokens": 16}


def save_wrapper(checkpoint: Path, dest: Path) -> Path:
    """Build an int4 ONNX model of `checkpoint` and save it as the ONNX chat wrapper at `dest`."""
    scratch = dest.parent / f"{dest.name}-build"
    scratch.mkdir(parents=True, exist_ok=True)
    build_onnx("int4", checkpoint, scratch / ONNX_ARTIFACT, scratch, "cpu")
    seal_onnx_folder(scratch / ONNX_ARTIFACT, f"test-build:{checkpoint.name}", "test")
    mlflow.pyfunc.save_model(
        str(dest), **wrapper_model_arguments(scratch / ONNX_ARTIFACT, "tiny-phi3", GREEDY_DEFAULTS)
    )
    return dest


@pytest.fixture(scope="session")
def wrapper_dir(trained_tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX chat wrapper of the trained tiny Phi-3, saved as an MLflow model folder."""
    return built_once(tmp_path_factory, "wrapper", lambda folder: save_wrapper(trained_tiny_phi3, folder))


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """What log_pipeline's HF_HUB_OFFLINE=1 does, for code in this process, where huggingface_hub
    read the variable at import: MLflow's license lookup fails at once instead of timing out."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@pytest.fixture(scope="session")
def pipeline_dir(trained_tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline model of the trained tiny Phi-3, saved as log_pipeline logs it, from a copy
    of the checkpoint that is gone once saved: the model must not need the folder it came from."""
    from slmkit.models.pipeline import build_pipeline, generation_config, pipeline_model_arguments

    def save(folder: Path) -> None:
        scratch = Path(shutil.copytree(trained_tiny_phi3, folder.parent / f"{folder.name}-scratch-checkpoint"))
        pipeline = build_pipeline(scratch, "auto", "tiny-phi3")
        with hub_offline():
            mlflow.transformers.save_model(
                path=str(folder), **pipeline_model_arguments(pipeline, generation_config(0, 16))
            )
        shutil.rmtree(scratch)

    return built_once(tmp_path_factory, "pipeline", save)


@pytest.fixture(scope="session")
def wrapper(wrapper_dir: Path) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(str(wrapper_dir))
