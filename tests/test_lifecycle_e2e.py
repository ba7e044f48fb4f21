"""Lifecycle end to end: optimize logging a compiled version, rag served from its own artifact (on the
embedded model), the assistant's use of history, and traces written by the gateway (on the stub LM; optimize on
the embedded model is run by test_user_project_e2e.py in a fresh virtualenv, and by `make flywheel`'s improve
in test_flywheel_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from tests.support.cli import cli_in_process, environment, last_json, run_cli, store_env
from tests.support.inprocess import asgi_client, gateway_app, program_host
from tests.support.processes import ROOT, gateway, stub_requests


def test_optimize_logs_a_new_version_with_different_state_and_both_scores(registry, stub_env, tmp_path):
    store = registry.copy(tmp_path / "store")
    env = store.env(DSPY_LM="openai/stub-echo", **stub_env)
    result = cli_in_process("optimize", "--program", "qa", "--optimizer", "bootstrap", "--json", env=env).json()
    assert result["registered_model"] == "dspy-qa" and int(result["version"]) == len(store.logged) + 1

    client = MlflowClient(store.uri)
    version = client.get_model_version("dspy-qa", result["version"])
    assert version.tags["optimizer"] == "bootstrap"
    assert float(version.tags["score_before"]) == pytest.approx(result["dev_score_before"], abs=0.01)
    assert float(version.tags["dev_score"]) == pytest.approx(result["dev_score"], abs=0.01)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert {"dev_score", "dev_score_before"} <= set(metrics)

    with environment(env):
        old = json.loads(mlflow.artifacts.load_text(f"runs:/{store.logged[0]['run_id']}/program_state.json"))
        new = json.loads(mlflow.artifacts.load_text(f"runs:/{result['run_id']}/program_state.json"))
    assert new != old
    assert new["predict"]["demos"] and not old["predict"]["demos"]


@pytest.mark.embedded  # its `cited: list[int]` needs an LM that answers in its schema (the stub echoes)
def test_rag_answers_with_citations_from_its_artifact_with_the_corpus_gone(tmp_path):
    # Processes: in this one the example `rag` module already loaded would stand in for the artifact's copy.
    copy = tmp_path / "examples"
    shutil.copytree(ROOT / "programs", copy)
    env = store_env(tmp_path)
    logged = last_json(run_cli("log", f"{copy}/rag.py:build", "--answer-field", "answer", "--no-eval", "--json",
                               env=env))
    shutil.rmtree(copy)  # no code, no corpus, no dataset: only the artifact is left

    question = {"messages": [{"role": "user", "content": "How long is the warranty on a Nimbus frame?"}]}
    with gateway(["-m", logged["model_uri"], "--no-traces"], tmp_path, **env) as base:
        invocation = httpx.post(f"{base}/invocations", json=question, timeout=120).json()
        chat = httpx.post(f"{base}/v1/chat/completions", json=question, timeout=120).json()
    prediction = json.loads(invocation["choices"][0]["message"]["content"])
    sources = {c["source"] for c in prediction["citations"]}
    assert sources and sources <= {"warranty.md", "stores.md", "models.md", "company.md"}
    assert "warranty.md" in sources  # BM25 puts the warranty passage first
    assert "Sources: [1]" in chat["choices"][0]["message"]["content"]


async def ask(client: httpx.AsyncClient, messages: list[dict]) -> str:
    reply = (await client.post("/v1/chat/completions", json={"messages": messages})).json()
    return reply["choices"][0]["message"]["content"]


async def test_the_assistants_answer_depends_on_history(stub):
    question = {"role": "user", "content": "What is my name, assistant?"}
    history = [{"role": "user", "content": "My name is Ana."}, {"role": "assistant", "content": "Hello, Ana."}]
    async with asgi_client(gateway_app(stub, program="assistant")) as client:
        alone, with_history = await ask(client, [question]), await ask(client, [*history, question])
    assert alone == "answer: What is my name, assistant?"
    assert with_history == "answer: What is my name, assistant? (after 1 earlier turns)"
    [seen] = [r for r in stub_requests(stub) if "Hello, Ana." in json.dumps(r["body"])]
    prompt = json.dumps(seen["body"]["messages"])
    assert "My name is Ana." in prompt and "Hello, Ana." in prompt


PLANTED = "sk-trace-planted-4e1f0b"


def test_the_gateway_writes_one_trace_per_request_without_keys(stub, tmp_path):
    """Traces on: the app started as a server starts it (its trace writer process on this test's store)."""
    env = store_env(tmp_path / "traced", OPENAI_API_KEY=PLANTED)
    quiet = store_env(tmp_path / "quiet", OPENAI_API_KEY=PLANTED)

    async def serve(traces: bool, questions: tuple[str, ...]) -> None:
        # The stop waits for the writer (a process of its own, slow to start on a busy machine) as long as it
        # takes: this test is about what is written, not how soon.
        app = gateway_app(host=program_host("qa", api_base=stub), traces=traces, trace_flush_timeout=300)
        async with asgi_client(app, lifespan=True) as client:
            for text in questions:
                assert (await ask(client, [{"role": "user", "content": text}])).startswith("answer:")

    with environment(env):
        asyncio.run(serve(True, ("first?", "second?")))  # its stop flushes the queued traces
        experiment = mlflow.get_experiment_by_name("mlflow-dspy")
        traces = []
        for _ in range(100):  # written by another process: wait for both root spans
            traces = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
            if len(traces) >= 2 and all(any(s.parent_id is None for s in t.data.spans) for t in traces):
                break
            time.sleep(0.2)
    assert len(traces) == 2
    for trace in traces:
        kinds = {span.span_type for span in trace.data.spans}
        assert "CHAT_MODEL" in kinds
        assert trace.info.token_usage["total_tokens"] > 0
        assert PLANTED not in trace.to_json()
    requests = {json.dumps(t.data.spans[0].inputs) for t in traces}
    assert any("first?" in r for r in requests) and any("second?" in r for r in requests)

    with environment(quiet):
        asyncio.run(serve(False, ("untraced?",)))
        experiment = mlflow.get_experiment_by_name("mlflow-dspy")
        assert experiment is None or not mlflow.search_traces(locations=[experiment.experiment_id],
                                                              return_type="list")
