"""Lifecycle end to end, as users run it: optimize with the embedded model, a
champion served by `mlflow models serve`, rag served from its own artifact,
the assistant's use of history, and traces written by the gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import store_env
from tests.support.processes import ROOT, gateway, mlflow_serve, stub_lm

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "mlflow_dspy.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_optimize_logs_a_new_version_with_different_state_and_both_scores(embedded_qa, embedded_store):
    env = store_env(embedded_store)
    proc = cli("optimize", "--program", "qa", "--optimizer", "bootstrap", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["registered_model"] == "dspy-qa" and int(result["version"]) > int(embedded_qa["version"])

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    version = client.get_model_version("dspy-qa", result["version"])
    assert version.tags["optimizer"] == "bootstrap"
    assert float(version.tags["score_before"]) == pytest.approx(result["dev_score_before"], abs=0.01)
    assert float(version.tags["dev_score"]) == pytest.approx(result["dev_score"], abs=0.01)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert {"dev_score", "dev_score_before"} <= set(metrics)

    old = json.loads(mlflow.artifacts.load_text(f"runs:/{embedded_qa['run_id']}/program_state.json"))
    new = json.loads(mlflow.artifacts.load_text(f"runs:/{result['run_id']}/program_state.json"))
    assert new != old
    assert new["predict"]["demos"] and not old["predict"]["demos"]


def test_promoted_champion_is_served_by_mlflow_models_serve(embedded_qa, embedded_store, tmp_path):
    env = store_env(embedded_store)
    proc = cli("promote", "--name", "dspy-qa", "--version", embedded_qa["version"], "--force",
               "--reason", "serve test", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dspy-qa@champion -> version" in proc.stdout
    with mlflow_serve("models:/dspy-qa@champion", tmp_path, **env) as base:
        response = httpx.post(f"{base}/invocations", json={"messages": [{"role": "user", "content": "Hi?"}]},
                              timeout=120)
    assert response.status_code == 200
    assert json.loads(response.json()["choices"][0]["message"]["content"])["answer"].strip()


def test_rag_answers_with_citations_from_its_artifact_with_the_corpus_gone(tmp_path):
    copy = tmp_path / "examples"
    shutil.copytree(ROOT / "programs", copy)
    env = store_env(tmp_path)
    proc = cli("log", f"{copy}/rag.py:build", "--answer-field", "answer", "--no-eval", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(copy)  # no code, no corpus, no dataset: only the artifact is left

    serve_env = store_env(tmp_path)
    question = {"messages": [{"role": "user", "content": "How long is the warranty on a Nimbus frame?"}]}
    with gateway(["-m", logged["model_uri"], "--no-traces"], tmp_path, **serve_env) as base:
        invocation = httpx.post(f"{base}/invocations", json=question, timeout=120).json()
        chat = httpx.post(f"{base}/v1/chat/completions", json=question, timeout=120).json()
    prediction = json.loads(invocation["choices"][0]["message"]["content"])
    sources = {c["source"] for c in prediction["citations"]}
    assert sources and sources <= {"warranty.md", "stores.md", "models.md", "company.md"}
    assert "warranty.md" in sources  # BM25 puts the warranty passage first
    assert "Sources: [1]" in chat["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    with stub_lm(tmp_path_factory.mktemp("stub")) as base:
        yield {"DSPY_LM_API_BASE": base, "OPENAI_API_KEY": "sk-trace-planted-4e1f0b"}


def ask(base: str, messages: list[dict]) -> str:
    reply = httpx.post(f"{base}/v1/chat/completions", json={"messages": messages}, timeout=60).json()
    return reply["choices"][0]["message"]["content"]


def test_the_assistants_answer_depends_on_history(stub, tmp_path):
    question = {"role": "user", "content": "What is my name?"}
    history = [{"role": "user", "content": "My name is Ana."}, {"role": "assistant", "content": "Hello, Ana."}]
    with gateway(["--program", "assistant", "--lm", "openai/stub-echo", "--no-traces"], tmp_path, **stub) as base:
        alone, with_history = ask(base, [question]), ask(base, [*history, question])
    assert alone == "answer: What is my name?"
    assert with_history == "answer: What is my name? (after 1 earlier turns)"
    seen = httpx.get(stub["DSPY_LM_API_BASE"].replace("/v1", "/_requests")).json()
    prompt = json.dumps(seen[-1]["body"]["messages"])
    assert "My name is Ana." in prompt and "Hello, Ana." in prompt


def test_the_gateway_writes_one_trace_per_request_without_keys(stub, tmp_path):
    env = store_env(tmp_path, **stub)
    with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, **env) as base:
        for text in ("first?", "second?"):
            assert ask(base, [{"role": "user", "content": text}]).startswith("answer:")
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        experiment = mlflow.get_experiment_by_name("mlflow-dspy")
        traces = []
        for _ in range(100):  # spans are exported in the background: wait for both root spans
            traces = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
            if len(traces) >= 2 and all(any(s.parent_id is None for s in t.data.spans) for t in traces):
                break
            time.sleep(0.2)
    assert len(traces) == 2
    for trace in traces:
        kinds = {span.span_type for span in trace.data.spans}
        assert "CHAT_MODEL" in kinds
        assert trace.info.token_usage["total_tokens"] > 0
        assert "sk-trace-planted" not in trace.to_json()
    requests = {json.dumps(t.data.spans[0].inputs) for t in traces}
    assert any("first?" in r for r in requests) and any("second?" in r for r in requests)

    with gateway(["--program", "qa", "--lm", "openai/stub-echo", "--no-traces"], tmp_path,
                 **store_env(tmp_path / "quiet", **stub)) as base:
        ask(base, [{"role": "user", "content": "untraced?"}])
    quiet = f"sqlite:///{tmp_path / 'quiet' / 'mlflow.db'}"
    mlflow.set_tracking_uri(quiet)
    experiment = mlflow.get_experiment_by_name("mlflow-dspy")
    assert experiment is None or not mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
