"""Where the project lives, and the default local tracking store inside it."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The code that must travel inside every artifact: a served model unpickles
# classes from these packages (the chat wrapper, the embedded LM engine).
CODE_PACKAGES = ("programs", "lm_engine")
REQUIREMENTS_FILE = PROJECT_ROOT / "requirements.txt"

DEFAULT_ARTIFACTS_DIR = "mlartifacts"
EXPERIMENT_NAME = "mlflow-dspy"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's own SQLite store."""
    # The default is anchored to the project, not the working directory, so
    # `make ui` and `make serve` find what `log` wrote from anywhere.
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifacts_location(uri: str) -> str | None:
    """For a SQLite store, the `mlartifacts` folder beside the database file
    (what `mlflow ui --default-artifact-root ./mlartifacts` shows); for any other
    store, None: the server decides."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    database = Path(uri[len(prefix):])
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / DEFAULT_ARTIFACTS_DIR).resolve().as_uri()
