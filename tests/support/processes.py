"""Real server processes for tests: the stub LM, `mlflow models serve`, the gateway."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.processes import ROOT, VENV_BIN, child_env, free_port, running

__all__ = ["ROOT", "VENV_BIN", "child_env", "free_port", "gateway", "mlflow_serve", "running", "stub_lm"]


@contextmanager
def stub_lm(tmp_path: Path, latency: float = 0.0) -> Iterator[str]:
    """Run the stub LM server; yields its OpenAI base URL (…/v1)."""
    port = free_port()
    args = [sys.executable, "-m", "bench.stub_lm", "--port", str(port), "--latency", str(latency)]
    with running(args, f"http://127.0.0.1:{port}/_stats", child_env(), tmp_path / "stub_lm.log", timeout=60):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def mlflow_serve(model_uri: str, tmp_path: Path, **env: str) -> Iterator[str]:
    """`mlflow models serve` on a free port, as a user runs it; yields its base URL."""
    port = free_port()
    args = [os.path.join(VENV_BIN, "mlflow"), "models", "serve", "-m", model_uri, "-p", str(port),
            "--env-manager", "local"]
    # MLflow's own 60 s request limit is too tight for a busy two-core machine.
    env = {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "300", **env}
    with running(args, f"http://127.0.0.1:{port}/ping", child_env(**env), tmp_path / "serve.log"):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def gateway(target: list[str], tmp_path: Path, *options: str, **env: str) -> Iterator[str]:
    """`python mlflow_dspy.py gateway` (a real uvicorn) on a free port; yields its base URL once /ready."""
    port = free_port()
    args = [sys.executable, "mlflow_dspy.py", "gateway", *target, "--port", str(port), *options]
    log = tmp_path / f"gateway-{port}.log"
    keys = env.get("GATEWAY_API_KEYS")
    headers = {"Authorization": f"Bearer {keys.split(',')[0]}"} if keys else None
    with running(args, f"http://127.0.0.1:{port}/ready", child_env(**env), log, headers=headers) as proc:
        proc.log_path = log
        yield f"http://127.0.0.1:{port}"
