"""The command line as tests run it: in a subprocess (as users do), or in this process (when the subject is
what a command does, not the process it runs in)."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import ROOT, child_env

# What the LM choice reads: a test's store environment starts without the machine's own settings.
LM_VARIABLES = ("DSPY_LM", "DSPY_LM_API_BASE", "OPENAI_API_KEY")


_template: Path | None = None


def seeded_store(folder: Path) -> str:
    """`folder`'s SQLite tracking URI, its database already made (tables and MLflow's Default experiment):
    MLflow takes seconds to create and migrate a new one, and most tests need a fresh store. A copy of one
    empty database made once per session; the Default experiment's artifacts go to `folder/mlruns`."""
    global _template
    database = folder / "mlflow.db"
    if not database.exists():
        if _template is None:
            _template = _make_template()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(_template / "mlflow.db", database)
        with sqlite3.connect(database) as db:
            db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                       (str(_template), str(folder)))
        db.close()
    return f"sqlite:///{database}"


def _make_template() -> Path:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="mlflow-dspy-empty-store-"))
    atexit.register(shutil.rmtree, folder, True)
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns"))
    store.engine.dispose()
    return folder


def store_env(store: Path, **extra: str) -> dict[str, str]:
    """A child's environment with `store` (mlflow.db and mlartifacts/) as its tracking store (made now)."""
    env = child_env(MLFLOW_TRACKING_URI=seeded_store(store), **extra)
    for name in LM_VARIABLES:
        if name not in extra:
            env.pop(name, None)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`python mlflow_dspy.py ARGS` in a subprocess, from the checkout (the front door in a checkout)."""
    return subprocess.run([sys.executable, "mlflow_dspy.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_log_cli(*args: str, env: dict[str, str]) -> dict:
    """`python mlflow_dspy.py log ... --json` as a subprocess; returns its last stdout line, parsed."""
    return last_json(run_cli("log", *args, "--json", env=env, timeout=600))


@dataclass
class Ran:
    """What an in-process command did: its exit code and what it printed."""

    code: int
    out: str
    err: str

    def json(self) -> dict:
        assert self.code == 0, self.err[-3000:]
        return json.loads(self.out.strip().splitlines()[-1])


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment and MLflow's tracking URI as a child with `env` would have them, then back."""
    import mlflow

    keys = {"MLFLOW_TRACKING_URI", *LM_VARIABLES,
            *(k for k in env if os.environ.get(k) != env[k] and k not in ("PATH", "PYTHONPATH"))}
    saved = {key: os.environ.get(key) for key in keys}
    previous_uri = mlflow.get_tracking_uri()
    try:
        for key in keys:
            if key in env:
                os.environ[key] = env[key]
            else:
                os.environ.pop(key, None)
        if "MLFLOW_TRACKING_URI" in env:
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mlflow.set_tracking_uri(previous_uri)


def cli_in_process(*args: str, env: dict[str, str]) -> Ran:
    """`mlflow-dspy ARGS` run by `mlflow_dspy.cli.main` in this process, in `env`'s store and LM settings."""
    from mlflow_dspy import cli

    out, err = io.StringIO(), io.StringIO()
    with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return Ran(code, out.getvalue(), err.getvalue())
