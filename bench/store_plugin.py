"""The tracking-store plugin's entry points (pyproject.toml) made visible to a process without reinstalling the
checkout: a checkout installed before the entry points were declared (or not installed) has no metadata
naming them, and MLflow finds plugins only through installed metadata (`importlib.metadata.entry_points`).

`entry_points_path(folder)` writes a distribution's metadata holding the declared entry points (as setuptools
writes them at install) into `folder`; with `folder` on a process's `sys.path` (`plugin_pythonpath` for a child's
PYTHONPATH), MLflow loads them as it would after `pip install`. Nothing is installed or changed in the venv.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = "mlflow_dspy_entry_points"  # a name of its own: it does not shadow the installed mlflow-dspy's metadata


def declared_entry_points() -> dict[str, dict[str, str]]:
    """The entry points pyproject.toml declares: group -> name -> `module:function`."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"].get("entry-points", {})


def entry_points_path(folder: Path) -> Path:
    """Write the metadata into `folder` (created if need be); `folder`, to put on sys.path or PYTHONPATH."""
    info = folder / f"{DIST}-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
        for group, points in declared_entry_points().items()))
    return folder


def plugin_pythonpath(folder: Path) -> str:
    """A PYTHONPATH for a child process (an `mlflow server`) that finds the checkout and the entry points."""
    return os.pathsep.join([str(entry_points_path(folder)), str(ROOT)])
