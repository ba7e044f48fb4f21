"""Where the project lives, and the default local tracking store inside it."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The code that must travel inside every artifact: a served model unpickles
# classes from these packages (the chat wrapper, the embedded LM engine).
CODE_PACKAGES = ("programs", "lm_engine")
REQUIREMENTS_FILE = PROJECT_ROOT / "requirements.txt"

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS_DIR = "mlartifacts"
EXPERIMENT_NAME = "mlflow-dspy"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
