"""The programs DSPy's tutorials teach (tests/support/tutorials) on the embedded model, end to end, as a
user's package: each logged with its dev set, served by `mlflow models serve` and by the gateway (all in
one; MLflow's scoring app in process for six of them, `mlflow models serve` itself for the agent), its answer
typed as its outputs; a real stream (not DummyLM) of a module with only a `forward`, of
BestOfN and of a ReAct agent; `eval -m` of one; and the agent's tool calls in its trace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import store_env
from tests.support.cli import cli_in_process
from tests.support.inprocess import mlflow_scoring_client
from tests.support.processes import ROOT, gateway, mlflow_serve

pytestmark = pytest.mark.slow

TUTORIALS = ROOT / "tests" / "support" / "tutorials"
PROGRAMS = ("history", "orders", "best-of", "agent", "entities", "rag", "sentiment")
ASK = {  # a chat's last user message for each (several inputs: a JSON object of them)
    "history": "What is the capital of France?",
    "orders": json.dumps({"customer": "Ada", "message": "Two coffees please"}),
    "best-of": "What is 2 + 2?",
    "agent": "What is the capital of Peru?",
    "entities": "Alice flew to Paris.",  # a list[str] input: the text is its one item
    "rag": "How long does the warranty last?",
    "sentiment": "I loved it, works perfectly.",
}


def cli(*args: str, cwd: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "mlflow_dspy.py"), *args, "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.strip().splitlines()  # --json: the JSON line alone on stdout
    return json.loads(line)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """The tutorials project copied out, each program logged with the first two rows of its dev set."""
    base = tmp_path_factory.mktemp("tutorials")
    folder = base / "project"
    shutil.copytree(TUTORIALS, folder)
    for data in (folder / "data").glob("*.jsonl"):  # two rows each: the embedded model is slow on two cores
        data.write_text("\n".join(data.read_text().splitlines()[:2]) + "\n")
    env = store_env(base, PYTHONPATH=str(ROOT))
    logged = {name: cli("log", name, cwd=folder, env=env) for name in PROGRAMS}
    return {"folder": folder, "env": env, "logged": logged, "base": base}


@pytest.mark.embedded  # so is every test of `project`: logged, served and answered on the embedded model
def test_every_tutorial_program_logs_with_its_dev_set_and_a_score(project):
    for name, logged in project["logged"].items():
        assert logged["version"] == "1" and logged["dev_score"] is not None, (name, logged)
        assert logged["dev_failed"] is not None, (name, logged)
    assert project["logged"]["rag"]["registered_model"] == "dspy-tutorials-rag"  # not the example's dspy-rag


MLFLOW_SERVED = "agent"  # the program `mlflow models serve` runs in its own process: tools inside the server


@pytest.fixture(scope="module")
def served(project) -> dict[str, str]:
    """One gateway process serving every program (each loaded from its artifact in a fresh interpreter), and
    `mlflow models serve` for the agent."""
    logged, env, base = project["logged"], project["env"], project["base"]
    with ExitStack() as stack:
        uris = [part for item in logged.values() for part in ("-m", f"models:/{item['registered_model']}/1")]
        urls = {"gateway": stack.enter_context(gateway(uris, base, **env))}
        uri = f"models:/{logged[MLFLOW_SERVED]['registered_model']}/1"
        urls[MLFLOW_SERVED] = stack.enter_context(mlflow_serve(uri, base, **env))
        yield urls


def chat(name: str, project: dict) -> dict:
    return {"model": f"{project['logged'][name]['registered_model']}/1",
            "messages": [{"role": "user", "content": ASK[name]}]}


@pytest.mark.embedded
def test_both_servers_answer_every_program_and_the_answers_parse(project, served):
    """Each program through MLflow's /invocations (the agent from `mlflow models serve`, the others from the same
    scoring app in this process: about 9 CPU-seconds less each) and through the gateway's chat."""
    with httpx.Client(timeout=600) as client:
        for name in PROGRAMS:
            body = {"messages": chat(name, project)["messages"]}
            if name == MLFLOW_SERVED:
                mlflow = client.post(f"{served[name]}/invocations", json=body)
            else:
                uri = f"models:/{project['logged'][name]['registered_model']}/1"
                with mlflow_scoring_client(uri, project["env"]) as scoring:
                    mlflow = scoring.post("/invocations", json=body)
            assert mlflow.status_code == 200, (name, mlflow.text)
            ours = client.post(f"{served['gateway']}/v1/chat/completions", json=chat(name, project))
            assert ours.status_code == 200, (name, ours.text)
            assert ours.json()["choices"][0]["message"]["content"], name


@pytest.mark.embedded
def test_typed_outputs_come_back_typed(project, served):
    with httpx.Client(timeout=600) as client:
        order = client.post(f"{served['gateway']}/v1/chat/completions", json={
            **chat("orders", project), "response_format": {"type": "json_object"}})
        data = json.loads(order.json()["choices"][0]["message"]["content"])
        # One answer field that already is an object (a pydantic Order): json_object answers it as it is.
        assert isinstance(data["quantity"], int) and isinstance(data["item"], str)
        label = client.post(f"{served['gateway']}/v1/chat/completions", json=chat("sentiment", project))
        assert label.json()["choices"][0]["message"]["content"] in ("positive", "negative", "neutral")
        entities = client.post(f"{served['gateway']}/v1/chat/completions", json={
            **chat("entities", project), "response_format": {"type": "json_object"}})
        assert isinstance(json.loads(entities.json()["choices"][0]["message"]["content"])["entities"], list)


@pytest.mark.embedded
@pytest.mark.parametrize("name", ["history", "best-of", "agent"])
def test_a_real_stream_ends_with_the_answer(project, served, name):
    """A module with only a forward, BestOfN and ReAct stream on the embedded model: the role, text, a finish
    and [DONE], never an error event."""
    with httpx.Client(timeout=600) as client:
        streamed = client.post(f"{served['gateway']}/v1/chat/completions", json={**chat(name, project),
                                                                                  "stream": True})
    assert streamed.status_code == 200
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert not [chunk for chunk in chunks if "error" in chunk], chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text.strip(), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.embedded
def test_eval_scores_a_logged_program_on_the_embedded_model(project):
    logged = project["logged"]["sentiment"]
    result = cli("eval", "-m", f"models:/{logged['registered_model']}/1", "--dev", "data/reviews.jsonl",
                 cwd=project["folder"], env=project["env"])
    assert result["examples"] == 2 and 0 <= result["dev_score"] <= 100


@pytest.mark.embedded
def test_optimize_compiles_a_logged_program_on_the_embedded_model(project):
    """BootstrapFewShot on two rows of the classifier's data, on the embedded model: a new version, both scores."""
    name = project["logged"]["sentiment"]["registered_model"]
    result = cli("optimize", "sentiment", "--train", "data/reviews.jsonl", "--name", name,
                 cwd=project["folder"], env=project["env"])
    assert result["registered_model"] == name and result["version"] == "2", result
    assert 0 <= result["dev_score_before"] <= 100 and result["dev_failed"] is not None


@pytest.fixture(scope="module")
def stub_project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tutorials_stub") / "project"
    shutil.copytree(TUTORIALS, folder)
    return folder


@pytest.mark.parametrize("name", PROGRAMS)
def test_every_tutorial_program_optimizes_through_an_openai_lm(name, stub_project, stub_env, tmp_path,
                                                                monkeypatch):
    """`optimize` on an `openai/...` LM (the stub) for each program kind: it compiles, scores the dev set before
    and after (the stub's plain text does not parse as typed outputs: those rows fail, are counted and score 0,
    no traceback) and logs the compiled program as a version."""
    monkeypatch.chdir(stub_project)
    data = {"history": "history", "orders": "orders", "best-of": "numbers", "agent": "agent",
            "entities": "entities", "rag": "rag", "sentiment": "reviews"}[name]
    ran = cli_in_process("optimize", name, "--lm", "openai/stub-echo", "--train", f"data/{data}.jsonl", "--json",
                         env=store_env(tmp_path, **stub_env))
    assert ran.code == 0, ran.err[-3000:]
    result = json.loads(ran.out.strip().splitlines()[-1])
    assert result["version"] == "1" and result["dev_score"] is not None and result["dev_score_before"] is not None
    rows = len((stub_project / "data" / f"{data}.jsonl").read_text().splitlines())
    assert 0 <= result["dev_failed"] <= rows
    assert "Traceback" not in ran.err


@pytest.mark.embedded
def test_the_agents_tool_calls_are_tool_spans_of_its_trace(project, served):
    import time

    import mlflow

    with httpx.Client(timeout=600) as client:
        answered = client.post(f"{served['gateway']}/v1/chat/completions", json=chat("agent", project))
    trace_id = answered.headers["x-mlflow-trace-id"]
    mlflow.set_tracking_uri(project["env"]["MLFLOW_TRACKING_URI"])
    trace = None
    for _ in range(60):  # written by the gateway's trace writer a moment after the answer
        try:
            trace = mlflow.get_trace(trace_id)
        except Exception:
            trace = None
        if trace is not None:
            break
        time.sleep(0.5)
    assert trace is not None
    tools = [span for span in trace.data.spans if span.span_type == "TOOL"]
    assert tools and all(span.name.startswith("Tool.") for span in tools)


@pytest.mark.embedded
def test_an_agent_whose_steps_were_cut_by_max_tokens_says_length(project, served):
    """ReAct makes several LM calls; with max_tokens 40 the embedded engine cuts (and closes) its steps, and the
    answer, parsed all the same, finishes "length" as OpenAI reports a cut answer."""
    with httpx.Client(timeout=600) as client:
        cut = client.post(f"{served['gateway']}/v1/chat/completions", json={**chat("agent", project),
                                                                            "max_tokens": 40})
    assert cut.status_code == 200, cut.text
    assert cut.json()["choices"][0]["finish_reason"] == "length"
