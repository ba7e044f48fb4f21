"""Serving unpickles nothing, with real servers and a real store (issue 23, item 3): `mlflow models serve` answers
with `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`; a gateway whose process counts every `pickle.find_class`
(an audit hook installed before anything is imported: tests/support/pickle_audit.py) answers chats, streams and
/invocations with none; a model logged before (by the tree of PICKLE_ONLY_REF, which wrote the pickle alone)
still serves, from its pickle, with a warning naming the risk, and the same hook counts its unpickling; `rag` is
built from its saved index with its corpus gone; DSPy's tutorial programs are built from their own code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.cli import store_env
from tests.support.processes import ROOT, child_env, free_port, mlflow_serve, running

PICKLE_ONLY_REF = "2706cdf"  # the last tree whose `log` wrote MLflow's pickle alone (data/model.pkl)
CHAT = {"messages": [{"role": "user", "content": "What is the capital of Peru?"}]}


@contextmanager
def audited_gateway(target: list[str], tmp_path: Path, **env: str) -> Iterator[tuple[str, Path, Path]]:
    """The gateway (one worker: uvicorn in this very process) started under the audit hook: (its URL, the file of
    unpickled globals, its log)."""
    port = free_port()
    audit, log = tmp_path / f"unpickled-{port}.txt", tmp_path / f"gateway-{port}.log"
    audit.touch()
    args = [sys.executable, "-m", "tests.support.pickle_audit", "gateway", *target, "--port", str(port)]
    with running(args, f"http://127.0.0.1:{port}/ready", child_env(**env, PICKLE_AUDIT_LOG=str(audit)), log):
        yield f"http://127.0.0.1:{port}", audit, log


def ask_every_way(url: str) -> list[str]:
    """A chat, a streamed chat and /invocations; each answer's text."""
    with httpx.Client(timeout=120) as client:
        chat = client.post(f"{url}/v1/chat/completions", json=CHAT)
        assert chat.status_code == 200, chat.text
        streamed = client.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]"), streamed.text
        invocation = client.post(f"{url}/invocations", json=CHAT)
        assert invocation.status_code == 200, invocation.text
    return [chat.json()["choices"][0]["message"]["content"],
            json.loads(invocation.json()["choices"][0]["message"]["content"])["answer"]]


@pytest.fixture(scope="module")
def pickle_only(stub_env, tmp_path_factory) -> dict:
    """`qa` logged as `dspy-qa-pickled` by the tree of PICKLE_ONLY_REF (git archive of this repository), into a
    store of its own: a model as every model logged before this change is."""
    base = tmp_path_factory.mktemp("pickle_only")
    tree = base / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", PICKLE_ONLY_REF, "mlflow_dspy", "programs", "mlflow_dspy.py"],
                             cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    env = store_env(base / "store", DSPY_LM="openai/stub-echo", **stub_env)
    done = subprocess.run([sys.executable, str(tree / "mlflow_dspy.py"), "log", "qa", "--no-eval", "--json",
                           "--name", "dspy-qa-pickled"], cwd=base, env={**env, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"env": env, "base": base, "logged": json.loads(done.stdout.strip().splitlines()[-1])}


def test_a_logged_model_holds_its_recipe_and_state_beside_the_flavor_and_no_endpoint_or_key(registry):
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(registry.model_uri(1), tracking_uri=registry.uri))
    flavors = Model.load(str(local)).flavors
    assert flavors["python_function"]["loader_module"] == "mlflow_dspy.artifact.pyfunc"
    assert flavors["dspy"]["model_path"] == "data/model.pkl"  # mlflow.dspy.load_model still reads it
    assert (local / "code" / "mlflow_dspy" / "artifact" / "pyfunc.py").is_file()
    recipe = json.loads((local / "data" / "program_recipe.json").read_text())
    assert recipe["build"] == "qa:build" and recipe["lm"]["endpoint"] == "custom"
    for name in ("program_recipe.json", "program_state.json"):
        text = (local / "data" / name).read_text()
        assert "127.0.0.1" not in text and "api_base" not in text and "sk-" not in text, name


def test_mlflow_models_serve_answers_with_pickle_deserialization_disallowed(registry, stub_env, tmp_path):
    """MLflow refuses every pickle under MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false: the model is built from its
    code and state by its own python_function loader."""
    env = registry.env(**stub_env, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    with mlflow_serve("models:/dspy-qa/1", tmp_path, **env) as base:
        reply = httpx.post(f"{base}/invocations", json=CHAT, timeout=120)
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.json()["choices"][0]["message"]["content"])["answer"] == \
        "answer: What is the capital of Peru?"


def test_a_gateway_under_a_pickle_audit_hook_answers_with_nothing_unpickled(registry, stub_env, tmp_path):
    store = registry.copy(tmp_path / "store")  # traces on (its default): they are written into this copy
    with audited_gateway(["-m", "models:/dspy-qa/1"], tmp_path, **store.env(**stub_env)) as (url, audit, log):
        answers = ask_every_way(url)
        unpickled = audit.read_text().splitlines()
    assert answers == ["answer: What is the capital of Peru?"] * 2
    assert unpickled == [], unpickled
    assert "holds only a pickle" not in log.read_text()


def test_a_model_logged_before_serves_from_its_pickle_with_a_warning_naming_the_risk(pickle_only, tmp_path):
    with audited_gateway(["-m", "models:/dspy-qa-pickled/1", "--no-traces"], tmp_path,
                         **pickle_only["env"]) as (url, audit, log):
        answers = ask_every_way(url)
        unpickled = audit.read_text().splitlines()
    assert answers == ["answer: What is the capital of Peru?"] * 2
    # The hook does see a pickle: the program's classes, looked up by name as the pickle names them.
    assert "mlflow_dspy.program.chat.ChatProgram" in unpickled, unpickled
    warning = next(line for line in log.read_text().splitlines() if "holds only a pickle" in line)
    assert "models:/dspy-qa-pickled/1" in warning and "run" in warning and "artifact store" in warning
    assert "Log the program again" in warning


LOAD_AUDITED = """
import json, sys
unpickled = []
sys.addaudithook(lambda event, args: unpickled.append(f"{args[0]}.{args[1]}") if event == "pickle.find_class" else None)
from mlflow_dspy.packaging.load import load_chat_model
report = {}
for uri in sys.argv[1:]:
    chat, metadata = load_chat_model(uri)
    program = chat.program
    report[uri] = {"class": type(program).__name__, "module_file": sys.modules[type(program).__module__].__file__,
                   "answer_fields": list(chat.mapping.answer_fields)}
    if hasattr(program, "retriever"):
        report[uri]["found"] = [hit["source"] for hit in program.retriever.search("How long is the warranty?")]
print(json.dumps({"models": report, "unpickled": unpickled}))
"""


def load_audited(uris: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Each model loaded (as the gateway, batch and eval load it) in a fresh process under the audit hook."""
    done = subprocess.run([sys.executable, "-c", LOAD_AUDITED, *uris], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rag_is_built_from_its_saved_index_with_its_corpus_gone(stub_env, tmp_path):
    copy = tmp_path / "examples"
    shutil.copytree(ROOT / "programs", copy)
    env = store_env(tmp_path / "store", DSPY_LM="openai/stub-echo", **stub_env)
    done = subprocess.run([sys.executable, str(ROOT / "mlflow_dspy.py"), "log", f"{copy}/rag.py:build",
                           "--answer-field", "answer", "--no-eval", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    uri = json.loads(done.stdout.strip().splitlines()[-1])["model_uri"]
    shutil.rmtree(copy)  # no code, no corpus: only the artifact is left

    loaded = load_audited([uri], tmp_path, env)
    rag = loaded["models"][uri]
    assert loaded["unpickled"] == [] and rag["class"] == "RAG"
    assert "/data/program_files" not in rag["module_file"] and rag["module_file"].endswith("/code/rag.py")
    assert rag["found"][0] == "warranty.md"  # BM25 over the saved index, the corpus deleted


LOG_ALL = """
import json, sys
from mlflow_dspy.cli import main
for name in sys.argv[1:]:
    assert main(["log", name, "--no-eval", "--json"]) == 0, name
"""


def test_the_tutorial_programs_are_built_from_their_own_code_and_state(stub_env, tmp_path):
    """DSPy's tutorial programs (a custom module, typed outputs, BestOfN, ReAct with tools, a builder, a class),
    logged on the stub, then loaded in a process where their package cannot be imported but from the artifact."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "tests" / "support" / "tutorials", project)
    names = ["history", "orders", "best-of", "agent", "entities", "rag", "sentiment"]
    env = store_env(tmp_path / "store", DSPY_LM="openai/stub-echo", **stub_env)
    done = subprocess.run([sys.executable, "-c", LOG_ALL, *names], cwd=project, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(logged) == len(names)
    assert "logged with its pickle alone" not in done.stderr, done.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    uris = [f"models:/{item['registered_model']}/1" for item in logged]
    loaded = load_audited(uris, elsewhere, env)
    assert loaded["unpickled"] == []
    classes = {uri: model["class"] for uri, model in loaded["models"].items()}
    assert sorted(classes.values()) == sorted(["ChatWithHistory", "OrderTaker", "BestOfN", "ReAct", "ChainOfThought",
                                               "RAG", "ChainOfThought"]), classes
    for model in loaded["models"].values():  # the user's classes come from the artifact's copy of their package
        if model["class"] in ("ChatWithHistory", "OrderTaker", "RAG"):  # (in the model's private verified copy)
            assert "/mlflow-dspy-model-" in model["module_file"], model
            assert "/code/tutorials/" in model["module_file"], model
