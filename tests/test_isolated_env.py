"""A logged model serves from its own artifact in a fresh environment:
`mlflow models serve --env-manager virtualenv` builds the environment from the
requirements recorded in the artifact only, outside this checkout."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import store_env
from tests.support.processes import VENV_BIN, free_port, running

pytestmark = pytest.mark.slow

WHEELHOUSE = Path(os.environ.get("WHEELHOUSE", Path.home() / ".cache" / "mlflow-dspy" / "wheelhouse"))


def test_tutorial_curl_is_answered_from_an_isolated_virtualenv(embedded_qa, embedded_store, tmp_path):
    port = free_port()
    env = store_env(embedded_store)
    env.pop("PYTHONPATH", None)  # nothing of this checkout: the artifact's code/ is all there is
    # How llama-cpp-python's build flags reach the environment MLflow builds:
    # pip runs inside it with this environment, so CMAKE_ARGS applies to a source
    # build, and the project's wheelhouse (built with those flags) spares the build.
    env["CMAKE_ARGS"] = "-DGGML_NATIVE=OFF"
    env["PIP_FIND_LINKS"] = " ".join(filter(None, [str(WHEELHOUSE), env.get("PIP_FIND_LINKS")]))
    env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = "300"
    args = [os.path.join(VENV_BIN, "mlflow"), "models", "serve", "-m", embedded_qa["model_uri"], "-p", str(port),
            "--env-manager", "virtualenv"]
    log = tmp_path / "serve.log"
    # The server starts outside the project.
    with running(args, f"http://127.0.0.1:{port}/ping", env, log, timeout=1200, cwd=tmp_path):
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=300,
                              json={"messages": [{"content": "what is 2 + 2?", "role": "user"}]})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"])["answer"].strip()

    # The environment is MLflow's own, built from the artifact's requirements...
    [activate] = set(re.findall(r"source (\S+/bin/activate)", log.read_text()))
    python = Path(activate).parent / "python"
    assert ".mlflow/envs/" in activate and python.exists()
    # ...and neither this tool nor the program is installed there: only the artifact's code/ folder has them.
    probe = subprocess.run([str(python), "-c", "import mlflow_dspy"], cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"]})
    assert probe.returncode != 0
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    assert "dspy==3.4.1" in freeze and "llama_cpp_python==0.3.36" in [f.replace("-", "_") for f in freeze]
