"""Databricks launcher: run one step of this project as `python -m steps.<step>` does locally.

A Databricks `spark_python_task` runs a file with that file's folder as its working directory
and import path, while the steps import `slmkit` from the project root. This launcher, and only
it, puts the bundle's root first on the import path, moves there, and hands over to the step.

Usage: run_step.py {download|log_pipeline|log_onnx_wrapper|evaluate|batch_infer|main} [the step's flags]
(the steps declared in slmkit/workflow/steps.py). Each step records its own params, cache key and
lineage on its run, so a run started here is the same as one `mlflow run` starts.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from slmkit.workflow.steps import STEPS

    if len(sys.argv) < 2 or sys.argv[1] not in STEPS:
        sys.exit(f"usage: run_step.py {{{'|'.join(STEPS)}}} [the step's flags]")
    step = sys.argv.pop(1)
    runpy.run_module(f"steps.{step}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
