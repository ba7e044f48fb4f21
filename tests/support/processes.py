"""Real server processes for tests: the stub LM, `mlflow models serve`, the gateway; and the stub's own routes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.processes import ROOT, VENV_BIN, child_env, free_port, running

__all__ = ["ROOT", "VENV_BIN", "Served", "child_env", "free_port", "gateway", "mlflow_serve", "running", "stub_lm",
           "stub_mode", "stub_requests", "stub_stats", "until"]


@contextmanager
def stub_lm(tmp_path: Path, latency: float = 0.0, port: int | None = None) -> Iterator[str]:
    """Run the stub LM server; yields its OpenAI base URL (…/v1)."""
    port = port or free_port()
    args = [sys.executable, "-m", "bench.stub_lm", "--port", str(port), "--latency", str(latency)]
    with running(args, f"http://127.0.0.1:{port}/_stats", child_env(), tmp_path / f"stub_lm-{port}.log", timeout=60):
        yield f"http://127.0.0.1:{port}/v1"


def _admin(base: str) -> str:
    """The stub's own routes, beside its OpenAI base URL (…/v1)."""
    return base.removesuffix("/v1")


def stub_stats(base: str) -> dict:
    """The stub's counts: total requests, hung ones whose caller left (abandoned), streams being sent."""
    return httpx.get(f"{_admin(base)}/_stats", timeout=30, trust_env=False).json()


def stub_requests(base: str, since: float = 0.0) -> list[dict]:
    """The requests the stub saw (body, Authorization header, time `t`), oldest first; those from `since` on.

    The stub keeps the last 2000 only, and one stub serves the whole session: select by time or by a question
    of the test's own, never by position."""
    seen = httpx.get(f"{_admin(base)}/_requests", timeout=30, trust_env=False).json()
    return [r for r in seen if r["t"] >= since]


@contextmanager
def stub_mode(base: str, mode: str) -> Iterator[None]:
    """Every answer of the stub faulty (`fail500`, ...) for a while, then back to normal."""
    httpx.post(f"{_admin(base)}/_mode", json={"mode": mode}, timeout=30, trust_env=False).raise_for_status()
    try:
        yield
    finally:
        httpx.post(f"{_admin(base)}/_mode", json={"mode": "ok"}, timeout=30, trust_env=False)


@contextmanager
def mlflow_serve(model_uri: str, tmp_path: Path, **env: str) -> Iterator[str]:
    """`mlflow models serve` on a free port, as a user runs it; yields its base URL."""
    port = free_port()
    args = [os.path.join(VENV_BIN, "mlflow"), "models", "serve", "-m", model_uri, "-p", str(port),
            "--env-manager", "local"]
    # MLflow's own 60 s request limit is too tight for a busy two-core machine.
    env = {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "300", **env}
    with running(args, f"http://127.0.0.1:{port}/ping", child_env(**env), tmp_path / f"serve-{port}.log"):
        yield f"http://127.0.0.1:{port}"


@dataclass
class Served:
    """A running gateway process: its base URL and the file its output goes to."""

    url: str
    log: Path
    pid: int = 0  # the process `running` started (uvicorn's workers are its children)
    proc: subprocess.Popen | None = None  # that process (to wait for its exit)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_lines(self, until: str | None = None) -> list[dict]:
        """Its JSON log lines (one per request); with `until`, waiting a little for one of that route (a line
        is written just after its response has left)."""
        import json

        for _ in range(50):
            lines = [json.loads(line) for line in self.log_text().splitlines() if line.startswith('{"request_id"')]
            if until is None or any(line["route"] == until for line in lines):
                break
            time.sleep(0.1)
        return lines


@contextmanager
def gateway(target: list[str], tmp_path: Path, *options: str, **env: str) -> Iterator[str]:
    """`python mlflow_dspy.py gateway` (a real uvicorn) on a free port; yields its base URL once /ready."""
    with gateway_process(target, tmp_path, *options, **env) as served:
        yield served.url


@contextmanager
def gateway_process(target: list[str], tmp_path: Path, *options: str, **env: str) -> Iterator[Served]:
    """`python mlflow_dspy.py gateway` (a real uvicorn) on a free port, once /ready; yields it and its log."""
    port = free_port()
    args = [sys.executable, "mlflow_dspy.py", "gateway", *target, "--port", str(port), *options]
    log = tmp_path / f"gateway-{port}.log"
    keys = env.get("GATEWAY_API_KEYS")
    headers = {"Authorization": f"Bearer {keys.split(',')[0]}"} if keys else None
    with running(args, f"http://127.0.0.1:{port}/ready", child_env(**env), log, headers=headers) as proc:
        proc.log_path = log
        yield Served(f"http://127.0.0.1:{port}", log, proc.pid, proc)


def until(condition, seconds: float, every: float = 0.5) -> bool:
    """Poll `condition` until it holds or `seconds` have passed; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
