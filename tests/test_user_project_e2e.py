"""A new user's whole path, outside this checkout, with the embedded model and no network.

mlflow-dspy is pip-installed from a wheel into a fresh virtualenv; a user's
own package (tests/support/e2e_project: a `dspy.Module` subclass with two
predictors, a `Literal` and an `int` output, and a helper module it imports)
is copied to a temporary folder. There, as the user would:
`mlflow-dspy log helpdesk.triage:Triage --dev --metric --requirements`,
`mlflow models serve` and the gateway from another folder (where the user's
code is not importable), typed /predict, `eval -m`, `optimize`, `promote`;
then `mlflow-dspy init` and its starter project, logged and served as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT, free_port, running
from tests.support.venv import bin_path, clean_env

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(1800)]  # conftest's `installed` takes minutes
PROJECT = ROOT / "tests" / "support" / "e2e_project"
TICKET = {"messages": [{"role": "user", "content": "I was charged twice for my plan this month."}]}


@pytest.fixture(scope="module")
def venv(installed) -> Path:
    return installed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("user")
    project = base / "project"
    shutil.copytree(PROJECT, project)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return {"project": project, "elsewhere": elsewhere, "store": base / "store"}


def env_for(workspace: dict[str, Path], venv: Path) -> dict[str, str]:
    # The venv's bin first: `mlflow models serve` starts uvicorn by name.
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{workspace['store'] / 'mlflow.db'}")
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    for name in ("DSPY_LM", "DSPY_LM_API_BASE", "OPENAI_API_KEY"):
        env.pop(name, None)
    return env


def tool(venv: Path, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_path(venv, "mlflow-dspy")), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def logged(venv, workspace) -> dict:
    workspace["store"].mkdir(exist_ok=True)
    env = env_for(workspace, venv)
    # The dev set sits inside the package: it must not travel with the code.
    shutil.copy(workspace["project"] / "dev.jsonl", workspace["project"] / "helpdesk" / "dev.jsonl")
    return last_json(tool(venv, "log", "helpdesk.triage:Triage", "--dev", "helpdesk/dev.jsonl",
                          "--metric", "helpdesk.metrics:category_matches", "--requirements", "requirements.txt",
                          "--json", cwd=workspace["project"], env=env))


def test_log_ships_the_users_package_and_only_it(logged, workspace):
    assert set(logged) == {"run_id", "model_uri", "registered_model", "version", "dev_score", "dev_failed"}
    assert logged["registered_model"] == "dspy-triage" and logged["version"] == "1"
    assert 0 <= logged["dev_score"] <= 100
    run_dir = next(workspace["store"].rglob(f"{logged['run_id']}/artifacts"))
    model_dir = run_dir / "model"
    code = sorted(p.relative_to(model_dir / "code").as_posix() for p in (model_dir / "code").rglob("*")
                  if p.is_file())
    assert {"helpdesk/__init__.py", "helpdesk/triage.py", "helpdesk/helpers.py", "helpdesk/metrics.py"} <= set(code)
    assert "mlflow_dspy/program/chat.py" in code and "mlflow_dspy/lm_engine/llama_engine.py" in code
    # Nothing else of the user's tree, no bytecode, and none of the tool's upper layers.
    assert not [c for c in code if c.endswith(".pyc") or "dev.jsonl" in c or c.startswith("mlflow_dspy/gateway")]
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert "jiter==0.19.0" in requirements and "dspy==3.4.1" in requirements
    mapping = json.loads((run_dir / "chat_mapping.json").read_text())
    assert mapping["question_field"] == "ticket" and mapping["answer_fields"] == ["category", "priority"]


def test_mlflow_models_serve_answers_from_a_folder_where_the_code_is_not_importable(venv, workspace, logged):
    env = env_for(workspace, venv)
    port = free_port()
    args = [str(bin_path(venv, "mlflow")), "models", "serve", "-m", logged["model_uri"], "-p", str(port),
            "--env-manager", "local"]
    probe = subprocess.run([str(bin_path(venv, "python")), "-c", "import helpdesk"], cwd=workspace["elsewhere"],
                           env=env, capture_output=True)
    assert probe.returncode != 0  # the user's package is nowhere but in the artifact
    with running(args, f"http://127.0.0.1:{port}/ping", env, workspace["elsewhere"] / "serve.log",
                 cwd=workspace["elsewhere"]):
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=TICKET, timeout=300)
    assert response.status_code == 200, response.text
    answer = json.loads(response.json()["choices"][0]["message"]["content"])
    assert answer["category"] in ("billing", "technical", "other") and isinstance(answer["priority"], int)


def test_it_serves_from_an_isolated_virtualenv_where_neither_tool_nor_code_is_installed(venv, workspace, logged):
    env = env_for(workspace, venv)
    # How llama-cpp-python's build flags reach the environment MLflow builds:
    # pip runs inside it with this environment, so CMAKE_ARGS applies to the source
    # build. The artifact's requirements carry the lock's hashes, so that pip checks
    # every file: it builds llama-cpp-python from PyPI's sdist (whose hash is locked),
    # never from the project's wheelhouse (a local build no lock can name).
    env["CMAKE_ARGS"] = "-DGGML_NATIVE=OFF"
    env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = "300"
    port = free_port()
    args = [str(bin_path(venv, "mlflow")), "models", "serve", "-m", logged["model_uri"], "-p", str(port),
            "--env-manager", "virtualenv"]
    log = workspace["elsewhere"] / "virtualenv-serve.log"
    with running(args, f"http://127.0.0.1:{port}/ping", env, log, timeout=1200, cwd=workspace["elsewhere"]):
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=TICKET, timeout=300)
    assert response.status_code == 200, response.text
    assert set(json.loads(response.json()["choices"][0]["message"]["content"])) == {"category", "priority"}
    # The environment is MLflow's own, built from the artifact's requirements (the user's pin included)...
    [activate] = set(re.findall(r"source (\S+/bin/activate)", log.read_text()))
    python = Path(activate).parent / "python"
    assert ".mlflow/envs/" in activate and python.exists()
    # ...and neither this tool nor the user's package is installed there: only the artifact's code/ has them.
    for module in ("mlflow_dspy", "helpdesk"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], cwd=workspace["elsewhere"],
                               capture_output=True, env={"PATH": os.environ["PATH"]})
        assert probe.returncode != 0, module
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    assert "dspy==3.4.1" in freeze and "jiter==0.19.0" in freeze
    assert "llama_cpp_python==0.3.36" in [f.replace("-", "_") for f in freeze]


def test_gateway_answers_chat_and_typed_predict(venv, workspace, logged):
    env = env_for(workspace, venv)
    port = free_port()
    args = [str(bin_path(venv, "mlflow-dspy")), "gateway", "-m", "models:/dspy-triage/1", "--port", str(port),
            "--no-traces"]
    base = f"http://127.0.0.1:{port}"
    with running(args, f"{base}/ready", env, workspace["elsewhere"] / "gateway.log", cwd=workspace["elsewhere"]):
        chat = httpx.post(f"{base}/v1/chat/completions", json={"model": "dspy-triage/1", **TICKET}, timeout=300)
        typed = httpx.post(f"{base}/predict", json={"ticket": "The app crashes when I log in."}, timeout=300)
        wrong = httpx.post(f"{base}/predict", json={"ticket": 42}, timeout=60)
        schema = httpx.get(f"{base}/openapi.json", timeout=60).json()
    assert chat.status_code == 200, chat.text
    assert set(json.loads(chat.json()["choices"][0]["message"]["content"])) == {"category", "priority"}
    assert typed.status_code == 200, typed.text
    data = typed.json()["data"]
    assert data["category"] in ("billing", "technical", "other") and isinstance(data["priority"], int)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "ticket"
    schemas = json.dumps(schema["components"]["schemas"])
    assert '"ticket"' in schemas and '"priority"' in schemas and '"technical"' in schemas


def test_eval_scores_the_logged_model_on_the_users_dev_set(venv, workspace, logged):
    env = env_for(workspace, venv)
    result = last_json(tool(venv, "eval", "-m", "models:/dspy-triage/1", "--dev", "dev.jsonl",
                            "--metric", "helpdesk.metrics:category_matches", "--json",
                            cwd=workspace["project"], env=env))
    assert result["examples"] == 3 and 0 <= result["dev_score"] <= 100


def test_a_bad_data_row_stops_log_before_any_run_with_its_line_number(venv, workspace, logged):
    env = env_for(workspace, venv)
    bad = workspace["project"] / "bad.jsonl"
    bad.write_text('{"ticket": "ok", "category": "billing", "priority": 1}\n{"ticket": "x", "priority": "high"}\n')
    proc = tool(venv, "log", "helpdesk.triage:Triage", "--dev", "bad.jsonl", cwd=workspace["project"], env=env)
    assert proc.returncode == 2
    assert "bad.jsonl line 2" in proc.stderr and "priority" in proc.stderr and "Traceback" not in proc.stderr
    missing = tool(venv, "log", "helpdesk.nothing:Triage", cwd=workspace["project"], env=env)
    assert missing.returncode == 2 and "module not found: 'helpdesk.nothing'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_optimize_and_promote_a_users_program(venv, workspace, logged):
    env = env_for(workspace, venv)
    optimized = last_json(tool(venv, "optimize", "helpdesk.triage:Triage", "--train", "dev.jsonl",
                               "--dev", "dev.jsonl", "--metric", "helpdesk.metrics:category_matches", "--json",
                               cwd=workspace["project"], env=env))
    assert optimized["registered_model"] == "dspy-triage" and optimized["version"] == "2"
    promoted = tool(venv, "promote", "--name", "dspy-triage", "--version", "2", "--force",
                    cwd=workspace["project"], env=env)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert "dspy-triage@champion -> version 2" in promoted.stdout


def test_init_writes_a_starter_project_that_logs_and_serves_as_it_is(venv, tmp_path):
    env = clean_env()
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    for name in ("DSPY_LM", "DSPY_LM_API_BASE", "OPENAI_API_KEY"):
        env.pop(name, None)
    made = tool(venv, "init", "starter", cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "starter"
    logged = last_json(tool(venv, "log", "starter", "--json", cwd=project, env=env))
    assert logged["registered_model"] == "dspy-starter" and logged["dev_score"] is not None
    # The default store is the project's own, never the installed package's.
    assert (project / "mlflow.db").exists() and (project / "mlartifacts").is_dir()
    port = free_port()
    args = [str(bin_path(venv, "mlflow-dspy")), "gateway", "--program", "starter", "--port", str(port),
            "--no-traces"]
    with running(args, f"http://127.0.0.1:{port}/ready", env, tmp_path / "gateway.log", cwd=project):
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"question": "What is 2 + 2?"}, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["answer"].strip()
