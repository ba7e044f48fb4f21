"""The team stack as one system (issue 24): PostgreSQL, `mlflow server` on it serving the artifacts, two gateway
replicas following `models:/dspy-qa@champion` behind HAProxy, Prometheus: all started once for the run by
scripts/stack.py (what `make stack` runs), in a folder of its own on free ports, and stopped at the end.

The life on it, from clients that know only the server's and the load balancer's URLs: log and eval; a promote
under load (no request fails, both replicas answer from the new version); feedback through the load balancer
whichever replica answered; both replicas' traces in PostgreSQL; `traces export` and `improve`; Spark batch
scoring of the champion. Then the faults: a replica killed under load; `mlflow server` down for 20 s, then
PostgreSQL restarted, under load (no chat request fails, the traces of answers sent after each restart are
stored). Last, `down()` keeps the database and the artifacts.

The load is on the stub LM (bench/stub_lm.py); the embedded SmolLM2 answers a chat and a stream through
HAProxy. No timed assertions: times are printed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pandas as pd
import pytest
from mlflow import MlflowClient

from scripts.stack import Ports, Stack
from tests.support.processes import stub_lm, until

QA = "dspy-qa"
EMBEDDED = "dspy-embedded"  # qa logged with the embedded SmolLM2, served by the same replicas
RELOAD_S = 1.0  # the replicas' --reload-interval
STORED = 0.99  # the share of traces that must reach PostgreSQL
CLIENTS = 8
PAUSE_S = 0.1  # each load client's pause between requests (a steady load, not a CPU flood on two cores)


# -- the stack, once for the run -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's tmp folder: PostgreSQL's own user must traverse every parent (pytest's is 0700).
    folder = Path(tempfile.mkdtemp(prefix="mlflow-dspy-stack-"))
    folder.chmod(0o755)
    with stub_lm(folder) as lm:
        stack = Stack(folder / "stack", Ports.free(), reload_interval=RELOAD_S,
                      lm_env={"DSPY_LM": "openai/stub-echo", "DSPY_LM_API_BASE": lm, "OPENAI_API_KEY": "sk-stack"},
                      models=(f"models:/{QA}@champion", f"models:/{EMBEDDED}@champion"),
                      log=lambda line: print(f"[stack {time.strftime('%H:%M:%S')}] {line}", flush=True))
        try:
            yield stack.up(bootstrap=bootstrap)
        finally:
            stack.down()
            shutil.rmtree(folder, ignore_errors=True)


def bootstrap(stack: Stack) -> None:
    """Both models logged into the server through the CLI, at once, and promoted: qa on the stub; qa on the
    embedded model (no DSPY_LM), scored on one dev row so that promote takes it."""
    dev = stack.folder / "one-row.jsonl"
    dev.write_text(json.dumps({"question": "What is the capital of France?", "answer": "Paris"}) + "\n")
    embedded_env = stack.client_env()
    for name in ("DSPY_LM", "DSPY_LM_API_BASE", "OPENAI_API_KEY"):
        embedded_env.pop(name)
    errors: list[BaseException] = []

    def run(*args, **kwargs) -> None:
        try:
            stack.bootstrap(*args, **kwargs)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(QA,)),
               threading.Thread(target=run, args=(EMBEDDED, "--dev", str(dev)), kwargs={"env": embedded_env})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# -- load through the load balancer --------------------------------------------------------------------------------
@dataclass
class Answer:
    sent: float  # time.monotonic() when sent
    done: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    replica: str = ""
    version: str = ""
    trace_id: str = ""
    token: str = ""
    error: str = ""


@dataclass
class Load:
    """Closed-loop chat completions through the load balancer from a thread, until stopped."""

    url: str
    clients: int = CLIENTS
    pause: float = PAUSE_S
    tag: str = "load"
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.clients),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            counter = iter(range(10**9))

            async def client() -> None:
                while not self._stop.is_set():
                    body = {"model": QA, "messages": [{"role": "user", "content": f"{self.tag} {next(counter)}?"}]}
                    sent = time.monotonic()
                    try:
                        async with session.post(f"{self.url}/v1/chat/completions", json=body) as reply:
                            await reply.read()
                            h = reply.headers
                            self.answers.append(Answer(sent, time.monotonic(), reply.status,
                                                       h.get("x-stack-replica", ""),
                                                       h.get("x-mlflow-dspy-model-version", ""),
                                                       h.get("x-mlflow-trace-id", ""),
                                                       h.get("x-mlflow-feedback-token", "")))
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        self.answers.append(Answer(sent, time.monotonic(), 0, error=repr(exc)))
                    await asyncio.sleep(self.pause)

            await asyncio.gather(*(client() for _ in range(self.clients)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def since(self, moment: float) -> list[Answer]:
        return [a for a in self.answers if a.sent >= moment]


def stored_trace_ids(stack: Stack, trace_ids: list[str]) -> set[str]:
    """The trace ids among `trace_ids` in MLflow's PostgreSQL database (its trace_info table)."""
    rows = stack.sql("SELECT request_id FROM trace_info WHERE request_id = ANY(%s)", list(trace_ids))
    return {row[0] for row in rows}


def chat(url: str, question: str, model: str = QA, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=300, trust_env=False,
                      json={"model": model, "messages": [{"role": "user", "content": question}], **extra})


# -- the life on the stack ----------------------------------------------------------------------------------------
def test_the_stack_is_up_with_each_part_in_its_place(stack):
    status = stack.status()
    assert all(state.startswith("running") for state in status.values()), status
    assert stack.replicas_up() == {"gw1", "gw2"}
    # PostgreSQL runs as its own user, never root, from the stack's folder.
    owner = stack.sql("SELECT current_setting('data_directory')")[0][0]
    assert owner == str(stack.pg_data)
    pid = int((stack.pg_data / "postmaster.pid").read_text().split()[0])
    assert Path(f"/proc/{pid}").stat().st_uid != 0
    # MLflow's tables are in PostgreSQL, and the version logged at start-up is there.
    assert stack.sql("SELECT name FROM registered_models ORDER BY name") == [(EMBEDDED,), (QA,)]
    # Prometheus scrapes both replicas.
    if stack.pid("prometheus"):
        def both_scraped() -> bool:
            reply = httpx.get(f"http://127.0.0.1:{stack.ports.prometheus}/api/v1/targets", timeout=10).json()
            return sum(t["health"] == "up" for t in reply["data"]["activeTargets"]) == 2
        assert until(both_scraped, 60), "Prometheus does not scrape both replicas"
    # Both replicas answer through the load balancer.
    seen = {chat(stack.lb_url, f"who {i}?").headers["x-stack-replica"] for i in range(4)}
    assert seen == {"gw1", "gw2"}


def test_log_and_eval_from_a_client_of_the_server(stack):
    logged = stack.cli("log", "qa", "--json")
    assert logged.returncode == 0, logged.stderr[-3000:]
    version = json.loads(logged.stdout.strip().splitlines()[-1])
    assert str(version["version"]) == "2" and version["registered_model"] == QA
    # The model's files went through the server to its artifacts folder; the run and version rows to PostgreSQL.
    [(source,)] = stack.sql("SELECT source FROM model_versions WHERE name = %s AND version = 2", QA)
    assert source.startswith(("mlflow-artifacts:", "models:/")), source
    [(artifact_uri,)] = stack.sql("SELECT artifact_uri FROM runs WHERE run_uuid = %s", version["run_id"])
    assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri
    assert list(stack.artifacts.rglob("MLmodel")), "no model files in the server's artifacts folder"
    dev = Path(__file__).resolve().parents[1] / "programs" / "data" / "qa" / "dev.jsonl"
    scored = stack.cli("eval", "-m", f"models:/{QA}/2", "--dev", str(dev), "--json")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.strip().splitlines()[-1])["dev_score"] >= 0


@pytest.mark.embedded
def test_the_embedded_model_answers_a_chat_and_a_stream_through_the_load_balancer(stack):
    reply = chat(stack.lb_url, "What is the capital of France?", model=EMBEDDED)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].strip()
    assert reply.headers["x-mlflow-dspy-model-version"] == f"{EMBEDDED}/1"
    with httpx.stream("POST", f"{stack.lb_url}/v1/chat/completions", timeout=300, trust_env=False,
                      json={"model": EMBEDDED, "stream": True,
                            "messages": [{"role": "user", "content": "Name a color."}]}) as streamed:
        assert streamed.status_code == 200
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join((json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for e in events[:-1])
    assert text.strip()
    assert {reply.headers["x-stack-replica"], streamed.headers["x-stack-replica"]} <= {"gw1", "gw2"}


def test_promote_under_load_fails_no_request_and_both_replicas_answer_from_the_new_version(stack):
    with Load(stack.lb_url, tag="promote") as load:
        assert until(lambda: {a.replica for a in load.answers} == {"gw1", "gw2"}, 60)
        at = time.monotonic()
        promoted = stack.cli("promote", "--name", QA, "--version", "2", "--alias", "champion")
        assert promoted.returncode == 0, promoted.stderr[-3000:]
        took = time.monotonic() - at

        def both_switched() -> bool:
            return {a.replica for a in load.since(at) if a.version == f"{QA}/2"} == {"gw1", "gw2"}

        switched = until(both_switched, 120, every=0.2)
        time.sleep(1)
    assert switched, "both replicas did not answer from version 2"
    assert not load.failed(), load.failed()[:5]
    for replica in ("gw1", "gw2"):
        mine = [a for a in load.answers if a.replica == replica]
        first_new = min(a.done for a in mine if a.version == f"{QA}/2")
        # Once a replica answers from version 2, it does not go back to 1.
        assert all(a.version == f"{QA}/2" for a in mine if a.sent > first_new), replica
        print(f"{replica}: first answer from version 2 {first_new - at:.2f} s after promote began (the command "
              f"took {took:.2f} s; reload interval {RELOAD_S} s)")
    # Both replicas' traces are in PostgreSQL.
    by_replica = {r: [a.trace_id for a in load.answers if a.replica == r] for r in ("gw1", "gw2")}
    assert until(lambda: all(stored_trace_ids(stack, ids) for ids in by_replica.values()), 60)
    print(f"promote under load: {len(load.answers)} answers, 0 failed")


def test_feedback_through_the_load_balancer_whichever_replica_answered(stack):
    with httpx.Client(base_url=stack.lb_url, timeout=60, trust_env=False) as client:
        answers = [client.post("/v1/chat/completions",
                               json={"model": QA, "messages": [{"role": "user", "content": f"Rate me {i}?"}]})
                   for i in range(10)]
        assert all(reply.status_code == 200 for reply in answers), [r.text for r in answers]
        # HAProxy takes turns: one more request, and each feedback post goes to the replica that did not answer.
        assert client.post("/v1/chat/completions", json={"model": QA, "messages": [
            {"role": "user", "content": "Not rated?"}]}).status_code == 200
        given = [client.post("/v1/feedback", json={"trace_id": reply.headers["x-mlflow-trace-id"], "value": True},
                             headers={"x-mlflow-feedback-token": reply.headers["x-mlflow-feedback-token"]})
                 for reply in answers]
    assert all(g.status_code == 200 for g in given), [g.text for g in given]
    crossed = sum(g.headers["x-stack-replica"] != a.headers["x-stack-replica"] for a, g in zip(answers, given,
                                                                                                strict=True))
    assert crossed, "no feedback went to the other replica"
    rated = [a.headers["x-mlflow-trace-id"] for a in answers]
    client = MlflowClient(stack.tracking_uri)

    def rated_in_store() -> bool:
        return all(any(a.name and a.feedback for a in client.get_trace(t).info.assessments) for t in rated)

    assert until(rated_in_store, 60)
    print(f"feedback: {crossed} of 10 posts taken by the other replica than the one that answered")


def test_traces_export_and_improve_against_the_server(stack, tmp_path):
    out = tmp_path / "rated.jsonl"
    exported = stack.cli("traces", "export", QA, "--feedback", "positive", "--out", str(out), "--json")
    assert exported.returncode == 0, exported.stderr[-3000:]
    report = json.loads(exported.stdout.strip().splitlines()[-1])
    assert report["written"] == 10, report
    assert {json.loads(line)["question"] for line in out.read_text().splitlines()} == {
        f"Rate me {i}?" for i in range(10)}
    # From the rated traces on the server, with a margin no score can beat: a candidate is optimized on them,
    # scored and registered; the champion stays.
    kept = stack.cli("improve", QA, "--from-traces", "--margin", "100", "--json")
    assert kept.returncode == 0, kept.stderr[-3000:]
    decision = json.loads(kept.stdout.strip().splitlines()[-1])
    assert decision["examples"] == 10 and decision["champion_version"] == "2"
    assert not decision["promote"] and decision["candidate_version"] == "3"
    assert stack.champion(QA) == "2"


def test_spark_batch_scores_the_champion_from_the_server(stack, tmp_path):
    rows = 40
    source = tmp_path / "questions.jsonl"
    pd.DataFrame({"id": range(rows), "question": [f"Batch row {i}?" for i in range(rows)]}).to_json(
        source, orient="records", lines=True)
    target = tmp_path / "answers.csv"
    done = stack.cli("batch", "-m", f"models:/{QA}@champion", "--input", str(source), "--output", str(target),
                     "--engine", "spark", "--concurrency", "8", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["rows"], report["computed"], report["failed"]) == (rows, rows, 0)
    output = pd.read_csv(target)
    assert list(output["id"]) == list(range(rows))
    assert list(output["answer"]) == [f"answer: Batch row {i}?" for i in range(rows)]


# -- faults ----------------------------------------------------------------------------------------------------------
def test_a_replica_killed_under_load_costs_at_most_its_requests_in_flight(stack):
    with Load(stack.lb_url, tag="kill") as load:
        assert until(lambda: {a.replica for a in load.answers} == {"gw1", "gw2"}, 60)
        killed_at = time.monotonic()
        stack.kill("gw2")
        assert until(lambda: stack.replicas_up() == {"gw1"}, 30), "HAProxy kept the killed replica"
        out_at = time.monotonic()
        until(lambda: len(load.since(out_at)) >= 50, 60)
    failed = load.failed()
    # Only requests in flight when the replica died may fail: at most one per client, all sent before the kill.
    assert len(failed) <= CLIENTS, failed
    assert all(a.sent <= killed_at + 0.05 for a in failed), failed
    after = load.since(out_at)
    assert after and all(a.status == 200 and a.replica == "gw1" for a in after)
    print(f"replica killed: {len(load.answers)} requests, {len(failed)} failed "
          f"({[a.error or a.status for a in failed]})")
    # The replica comes back, and the load balancer sends it requests again.
    stack.start_replica(1)
    assert until(lambda: stack.replicas_up() == {"gw1", "gw2"}, 60)
    assert "gw2" in {chat(stack.lb_url, f"back {i}?").headers["x-stack-replica"] for i in range(4)}


def test_the_tracking_server_down_20s_then_postgresql_restarted_under_load(stack):
    # 4 clients, 0.2 s apart: about 20 answers a second, which the writers' queues (2000 traces each) hold through
    # the outage and the tracking server on PostgreSQL takes afterwards on a shared two-core machine.
    with Load(stack.lb_url, clients=4, pause=0.2, tag="outage") as load:
        assert until(lambda: len(load.answers) >= 20, 60)
        stack.stop("mlflow")
        time.sleep(20)
        stack.start_server()
        server_back = time.monotonic()
        until(lambda: len(load.since(server_back)) >= 100, 60)
        stack.restart_postgres()
        pg_back = time.monotonic()
        until(lambda: len(load.since(pg_back)) >= 100, 60)
    assert not load.failed(), load.failed()[:5]
    for label, moment in (("mlflow server", server_back), ("PostgreSQL", pg_back)):
        ids = [a.trace_id for a in load.since(moment)]
        assert until(lambda ids=ids: len(stored_trace_ids(stack, ids)) >= STORED * len(ids), 180, every=2)
        print(f"after the {label} restart: {len(stored_trace_ids(stack, ids))} of {len(ids)} traces stored")
    print(f"outage window: {len(load.answers)} chat requests, 0 failed")


def test_down_keeps_the_database_and_the_artifacts(stack):
    last = chat(stack.lb_url, "The last question?").headers["x-mlflow-trace-id"]
    assert until(lambda: stored_trace_ids(stack, [last]), 60)
    versions = stack.sql("SELECT name, version FROM model_versions ORDER BY name, version")
    traces = stack.sql("SELECT count(*) FROM trace_info")[0][0]
    files = sorted(str(p.relative_to(stack.artifacts)) for p in stack.artifacts.rglob("*") if p.is_file())
    stack.down()
    assert all(state == "stopped" for state in stack.status().values()), stack.status()
    stack.start_postgres()
    assert stack.sql("SELECT name, version FROM model_versions ORDER BY name, version") == versions
    assert stack.sql("SELECT count(*) FROM trace_info")[0][0] == traces > 0
    assert sorted(str(p.relative_to(stack.artifacts)) for p in stack.artifacts.rglob("*") if p.is_file()) == files

