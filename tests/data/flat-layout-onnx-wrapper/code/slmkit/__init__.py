"""Library behind the MLflow Project's steps: pure, typed functions that know nothing of runs."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
