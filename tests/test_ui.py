"""The MLflow UI as a user sees it: `make ui` over the tracking store, offline,
and the run's Artifacts view rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.cli import store_env
from tests.support.processes import ROOT, free_port, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "mlflow-ui-run-artifacts.png"
# Flags for a closed network: without the background-networking ones Chromium
# keeps dialling Google's hosts.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=20000", "--window-size=1600,900"]


@pytest.fixture(scope="module")
def ui(embedded_qa, embedded_store, tmp_path_factory):
    port = free_port()
    env = store_env(embedded_store)
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)  # the Makefile must set it: offline, mlflow ui hangs without it
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    with running(["make", "--no-print-directory", "ui", f"UI_PORT={port}"], f"http://127.0.0.1:{port}/health",
                 env, log, timeout=240):
        yield f"http://127.0.0.1:{port}"


def test_make_ui_serves_the_store(ui, embedded_qa):
    base = f"{ui}/api/2.0/mlflow"
    models = httpx.get(f"{base}/registered-models/search", timeout=30).json()["registered_models"]
    assert [m["name"] for m in models] == ["dspy-qa"]
    run = httpx.get(f"{base}/runs/get", params={"run_id": embedded_qa["run_id"]}, timeout=30).json()["run"]
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["program"] == "qa"


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (Debian's chromium package)"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_run_artifacts_view_lists_the_model_pins_and_program_state(ui, embedded_qa, tmp_path):
    run = httpx.get(f"{ui}/api/2.0/mlflow/runs/get", params={"run_id": embedded_qa["run_id"]}, timeout=30).json()
    experiment = run["run"]["info"]["experiment_id"]
    page = f"{ui}/#/experiments/{experiment}/runs/{embedded_qa['run_id']}/artifacts/model/MLmodel"

    dom = chromium("--dump-dom", page, profile=tmp_path / "profile").stdout
    listed = set(re.findall(r'data-testid="artifact-tree-node" artifact-name="([^"]+)"', dom))
    assert {"model", "MLmodel", "requirements.txt", "conda.yaml", "program_state.json"} <= listed, listed
    assert "llm/v1/chat" in dom  # MLmodel's content is shown: the DSPy flavor's chat task

    SCREENSHOT.unlink(missing_ok=True)
    chromium(f"--screenshot={SCREENSHOT}", page, profile=tmp_path / "profile")
    assert SCREENSHOT.stat().st_size > 20_000
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
