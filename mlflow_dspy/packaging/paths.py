"""Where things are: the installed package, the user's project, and the default tracking store.

The package may run from a checkout or from site-packages, so nothing here
writes beside the code: the default store belongs to the user's project (the
nearest `pyproject.toml` with a `[tool.mlflow-dspy]` table, upward from the
working directory), or to the working directory when there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow_dspy.program.project import find_project_file

# mlflow_dspy/ itself, wherever it is installed; read-only.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The sys.path entry that holds mlflow_dspy (a checkout or site-packages):
# what a child process (a Spark worker) needs on PYTHONPATH to import it.
IMPORT_ROOT = PACKAGE_DIR.parent
# The full runtime lock, shipped inside the package (package data).
REQUIREMENTS_FILE = PACKAGE_DIR / "requirements.txt"

DEFAULT_DATABASE = "mlflow.db"
DEFAULT_ARTIFACTS_DIR = "mlartifacts"
EXPERIMENT_NAME = "mlflow-dspy"


def project_dir(start: Path | None = None) -> Path:
    """The user's project: the directory of the nearest project file (see
    find_project_file), else `start` / the working directory. Never the
    installed package's directory, unless the user works inside it."""
    found = find_project_file(start)
    return found.parent if found is not None else (start or Path.cwd()).resolve()


def default_tracking_uri(project_root: Path | None = None) -> str:
    """`sqlite:///<project>/mlflow.db`, for `project_root` or project_dir()."""
    root = project_root.resolve() if project_root is not None else project_dir()
    return f"sqlite:///{root / DEFAULT_DATABASE}"


def tracking_uri(project_root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's own SQLite store.

    The default is anchored to the project (not the working directory), so
    `log`, `serve` and `mlflow ui` find the same store from any subdirectory;
    its artifacts go to `mlartifacts` beside the database (artifacts_location)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_root)


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
