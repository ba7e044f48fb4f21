"""Shared fixtures: a private tracking store per test session, the CLI as users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT, child_env


def run_log_cli(*args: str, env: dict[str, str]) -> dict:
    """`python mlflow_dspy.py log ... --json` as a subprocess; returns its last stdout line, parsed."""
    proc = subprocess.run(
        [sys.executable, "mlflow_dspy.py", "log", *args, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def store_env(store: Path, **extra: str) -> dict[str, str]:
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}", **extra)
    for name in ("DSPY_LM", "DSPY_LM_API_BASE", "OPENAI_API_KEY"):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded_store")


@pytest.fixture(scope="session")
def embedded_qa(embedded_store) -> dict:
    """The qa program logged with the embedded model, through the CLI."""
    return run_log_cli("--program", "qa", env=store_env(embedded_store))
