"""What every part of the bench starts from: the `qa` program logged, and a server started on a fresh port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import ROOT, child_env, free_port, running

QUESTION = "What is the capital of France?"
CHAT = {"messages": [{"role": "user", "content": QUESTION}]}


def log_program(env: dict[str, str], *extra: str) -> tuple[dict, float]:
    """`mlflow-dspy log qa --no-eval`: its JSON line (run_id, model_uri, registered_model, version) and wall time."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "mlflow_dspy.py", "log", "--program", "qa", "--no-eval", "--json", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def log_model(env: dict[str, str], *extra: str) -> tuple[str, float]:
    logged, seconds = log_program(env, *extra)
    return logged["model_uri"], seconds


def gateway_args(model_uri: str | list[str], *extra: str) -> list[str]:
    """The gateway's command line serving one model URI, or several (`-m` each), with its defaults
    (traces on, as a user runs it); `extra` adds flags (`--no-traces` for the second row)."""
    uris = [model_uri] if isinstance(model_uri, str) else model_uri
    models = [part for uri in uris for part in ("-m", uri)]
    return [sys.executable, "mlflow_dspy.py", "gateway", *models, "--max-in-flight", "1024",
            "--port", "{port}", *extra]


def start(args: list[str], ready: str, env: dict[str, str], log: Path,
          cwd: Path | None = None) -> tuple[AbstractContextManager[subprocess.Popen], str, float]:
    """`running(...)` on a fresh port (in `cwd`, else the checkout); returns (context manager, base URL, start
    time)."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in args]
    base = f"http://127.0.0.1:{port}"
    return running(command, base + ready, env, log, timeout=300, cwd=cwd), base, time.perf_counter()


def scrape(base: str) -> list:
    """Every sample a server's `/metrics` shows now (prometheus_client's `Sample`: name, labels, value)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]



def trace_outcomes(base: str) -> dict[str, float]:
    """A gateway's trace counters now (`/metrics`, mlflow_dspy_traces_total): queued, written, dropped, ..."""
    return {sample.labels["outcome"]: sample.value for sample in scrape(base)
            if sample.name == "mlflow_dspy_traces_total"}

@contextmanager
def stub_lm_env(tmp_path: Path, latency: float) -> Iterator[tuple[str, dict[str, str]]]:
    """The stub LM on a free port (its log in `tmp_path`), and what a server on it needs in its environment (a
    SQLite store in `tmp_path`): yields (the stub's base URL, that environment)."""
    port = free_port()
    stub = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-m", "bench.stub_lm", "--port", str(port), "--latency", str(latency)],
                 f"{stub}/_stats", child_env(), tmp_path / "stub.log"):
        yield stub, child_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", DSPY_LM="openai/stub",
                              DSPY_LM_API_BASE=f"{stub}/v1", OPENAI_API_KEY="sk-bench")
