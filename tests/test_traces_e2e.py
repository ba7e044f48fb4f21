"""Every answer names its trace, and a graceful stop leaves a trace in the store for every answered
request not counted as dropped (a real gateway, the stub LM, a real SQLite tracking store). Feedback, the
export, sampling and refusals with the gateway app in process, started as a server starts it (its trace
writer is a process of its own); `improve` following a champion, and a tracking store that goes down, with
real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlflow
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dspy.program.datasets import load_examples
from mlflow_dspy.program.target import open_target
from tests.support.cli import cli_in_process, environment, last_json, run_cli, store_env
from tests.support.inprocess import asgi_client, gateway_app, program_host
from tests.support.processes import ROOT, VENV_BIN, child_env, free_port, gateway, gateway_process, running

QA = ["--program", "qa", "--lm", "openai/stub-echo"]


def traced_app(stub: str, **config):
    """The gateway app serving qa on the stub, traces on (into MLFLOW_TRACKING_URI's store)."""
    return gateway_app(host=program_host("qa", api_base=stub), traces=True, **config)


def trace_counts(text: str) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "mlflow_dspy_traces" for s in f.samples if s.name.endswith("_total")}


def test_answers_name_their_traces_and_a_graceful_stop_flushes_them(stub, tmp_path):
    env = store_env(tmp_path, DSPY_LM_API_BASE=stub)
    with gateway_process(QA, tmp_path, **env) as served:
        url = served.url

        def ask(i: int) -> tuple[str, str]:
            body = {"model": "dspy-qa", "messages": [{"role": "user", "content": f"Question number {i}?"}]}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.headers["x-mlflow-trace-id"], f"Question number {i}?"

        with ThreadPoolExecutor(16) as pool:
            answered = dict(pool.map(ask, range(300)))
        with httpx.Client(base_url=url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "A streamed question?"}], "stream": True}) as s:
                s.read()
            answered[s.headers["x-mlflow-trace-id"]] = "A streamed question?"
            invoked = client.post("/invocations", json={"messages": [{"role": "user", "content": "Invoked?"}]})
            answered[invoked.headers["x-mlflow-trace-id"]] = "Invoked?"
            predicted = client.post("/predict", json={"question": "Predicted?"})
            answered[predicted.headers["x-mlflow-trace-id"]] = "Predicted?"
            assert client.get("/health").headers.get("x-mlflow-trace-id") is None  # no program, no trace
    log = served.log_text()
    # The stop (SIGTERM) flushed the queue and said what became of every trace.
    queued, written, dropped = map(int, re.search(r"traces: (\d+) queued, (\d+) written, (\d+) dropped", log).groups())
    assert queued == len(answered) == 303 and written + dropped == queued
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("mlflow-dspy").experiment_id
    stored = {t.info.trace_id: t for t in mlflow.search_traces(locations=[experiment], return_type="list",
                                                               max_results=1000)}
    missing = set(answered) - set(stored)
    assert len(missing) <= dropped and len(stored) == written
    for trace_id, question in list(answered.items())[::25] + list(answered.items())[-3:]:
        if trace_id in stored:  # the trace holds that very request
            assert question in json.dumps(mlflow.get_trace(trace_id).data.spans[0].inputs)


def rating(reply) -> dict[str, str]:
    """The header that lets the caller who got `reply` rate it."""
    return {"x-mlflow-feedback-token": reply.headers["x-mlflow-feedback-token"]}


def test_feedback_is_recorded_as_assessments_on_the_answers_trace_and_bad_feedback_is_refused(stub, tmp_path):
    async def scenario():
        app = traced_app(stub, api_keys=("alice:sk-k",))
        async with asgi_client(app, lifespan=True, Authorization="Bearer sk-k") as client, \
                asgi_client(app) as keyless:
            reply = await client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "Capital?"}]})
            trace_id, token = reply.headers["x-mlflow-trace-id"], rating(reply)
            # At once: the trace may still be queued for the writer; feedback waits for it.
            given = await client.post("/v1/feedback", headers=token, json={
                "trace_id": trace_id, "value": False, "rationale": "wrong city", "expected": {"answer": "Paris"}})
            assert given.status_code == 200, given.text
            assert given.json()["source"] == "alice"

            async def post(body: dict):
                return await client.post("/v1/feedback", headers=token, json={"trace_id": trace_id, **body})

            refusals = {
                "value": await post({"value": "yes"}),
                "colour": await post({"value": 1, "colour": "red"}),
                "expected.city": await post({"value": True, "expected": {"city": "Paris"}}),
                "source": await post({"value": True, "source": "bob"}),
            }
            surrogate = await client.post("/v1/feedback", headers={"content-type": "application/json", **token},
                                          content=b'{"trace_id": "x", "value": true, "expected": {"\\ud800": "x"}}')
            unknown = await client.post("/v1/feedback", headers=token,
                                        json={"trace_id": "tr-" + "0" * 32, "value": True})
            without_key = await keyless.post("/v1/feedback", headers=token, json={"trace_id": trace_id, "value": True})
            return trace_id, refusals, surrogate, unknown, without_key

    env = store_env(tmp_path)
    with environment(env):
        trace_id, refusals, surrogate, unknown, without_key = asyncio.run(scenario())
    for field, refused in refusals.items():
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    assert "not an output of this program" in refusals["expected.city"].json()["error"]["message"]
    assert "caller's API key name" in refusals["source"].json()["error"]["message"]
    # The token names its trace: on another trace id it is not a token at all.
    assert unknown.status_code == 403 and unknown.json()["error"]["code"] == "feedback_token_invalid"
    assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
    assert without_key.status_code == 401
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assessments = {a.name: a for a in mlflow.get_trace(trace_id).info.assessments}
    feedback, expectation = assessments["user_feedback"], assessments["expected_outputs"]
    assert feedback.value is False and feedback.rationale == "wrong city" and feedback.source.source_id == "alice"
    assert expectation.source.source_id == "alice"
    assert expectation.value == {"answer": "Paris"}


async def test_feedback_without_tracing_says_tracing_is_off(stub):
    async with asgi_client(gateway_app(stub, traces=False), lifespan=True) as client:
        reply = await client.post("/v1/feedback", json={"trace_id": "tr-1", "value": True})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "tracing_off"
    assert "tracing is off" in reply.json()["error"]["message"]


def test_the_export_holds_exactly_the_rated_examples_in_the_data_format(stub, tmp_path):
    questions = ["Rated up?", "Corrected?", "Rated down?", "Rated up?", "Expected only?", "Not rated?"]
    verdicts = [{"value": True}, {"value": False, "expected": {"answer": "Fixed"}}, {"value": False},
                {"value": 1}, {"value": True, "expected": {"answer": "Given"}}, None]

    async def rate() -> None:
        async with asgi_client(traced_app(stub), lifespan=True) as client:
            for question, verdict in zip(questions, verdicts, strict=True):
                reply = await client.post("/v1/chat/completions",
                                          json={"messages": [{"role": "user", "content": question}]})
                if verdict is not None:
                    given = await client.post("/v1/feedback", headers=rating(reply), json={
                        "trace_id": reply.headers["x-mlflow-trace-id"], **verdict})
                    assert given.status_code == 200, given.text

    env = store_env(tmp_path)
    with environment(env):
        asyncio.run(rate())

    def export(*options: str) -> tuple[dict, list[dict]]:
        out = tmp_path / f"export{len(options)}{options[-1] if options else ''}.jsonl"
        done = cli_in_process("traces", "export", "dspy-qa", "--out", str(out), "--json", *options, env=env)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return done.json(), rows

    report, rows = export()
    assert report | {"out": None} == {"out": None, "traces": 6, "rated": 5, "written": 3, "duplicates": 1,
                                      "without_outputs": 1}
    by_question = {row["question"]: row for row in rows}
    assert set(by_question) == {"Rated up?", "Corrected?", "Expected only?"}
    assert by_question["Corrected?"]["answer"] == "Fixed" and by_question["Expected only?"]["answer"] == "Given"
    assert by_question["Rated up?"]["answer"]  # the program's own answer, rated up
    assert "reasoning" not in by_question["Rated up?"]
    assert {row["question"] for row in export("--feedback", "expected")[1]} == {"Corrected?", "Expected only?"}
    assert {row["question"] for row in export("--feedback", "negative")[1]} == {"Corrected?"}
    assert export("--since", "2999-01-01")[0]["traces"] == 0
    # What `--dev` and `--train` read, as it is.
    examples = load_examples(tmp_path / "export0.jsonl", open_target("qa").chat().mapping)
    assert len(examples) == 3


def test_improve_promotes_a_candidate_that_wins_and_keeps_the_champion_otherwise(registry, stub, tmp_path):
    # A copy of the shared registry: qa versions 1-3 logged on the stub, version 1 the champion.
    store = registry.copy(tmp_path / "store")
    env = store.env(DSPY_LM="openai/stub-echo", DSPY_LM_API_BASE=stub, OPENAI_API_KEY="sk-stub")
    versions = len(store.logged)

    def cli(*args: str) -> dict:  # improve as users run it: it loads the champion, which configures DSPy
        return last_json(run_cli(*args, env=env))

    with gateway(["-m", "models:/dspy-qa@champion", "--reload-interval", "0.5"], tmp_path, **env) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        for i in range(8):
            reply = client.post("/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]})
            rated = client.post("/v1/feedback", headers=rating(reply),
                                json={"trace_id": reply.headers["x-mlflow-trace-id"], "value": True})
            assert rated.status_code == 200, rated.text
        registry_client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))

        dry = cli("improve", "dspy-qa", "--from-traces", "--dry-run", "--json")
        assert dry["dry_run"] and dry["examples"] == 8 and (dry["train"], dry["heldout"]) == (6, 2)
        assert len(registry_client.search_model_versions("name='dspy-qa'")) == versions  # nothing registered
        assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before

        # No score beats another by more than 100 points: the champion is certain to stay.
        kept = cli("improve", "dspy-qa", "--from-traces", "--margin", "100", "--json")
        assert not kept["promote"] and kept["candidate_version"] == str(versions + 1)
        assert "not more than 100" in kept["why"]
        assert str(registry_client.get_model_version_by_alias("dspy-qa", "champion").version) == "1"
        # Any candidate beats the champion by more than -101 points: certain to be promoted.
        won = cli("improve", "dspy-qa", "--from-traces", "--margin", "-101", "--json")
        promoted = str(versions + 2)
        assert won["promote"] and won["candidate_version"] == promoted
        assert str(registry_client.get_model_version_by_alias("dspy-qa", "champion").version) == promoted
        # The gateway follows the alias: the promoted version answers.
        for _ in range(60):
            answered = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Now?"}]})
            if answered.json()["system_fingerprint"] == f"dspy-qa/{promoted}":
                break
            time.sleep(0.5)
        assert answered.json()["system_fingerprint"] == f"dspy-qa/{promoted}"
    run = registry_client.get_run(won["run_id"])
    assert run.data.tags["decision"] == "promoted" and run.data.tags["candidate_version"] == promoted
    assert {"champion_heldout_score", "candidate_heldout_score"} <= set(run.data.metrics)
    assert sorted(d.tags[0].value for d in run.inputs.dataset_inputs) == ["heldout", "train"]
    assert registry_client.get_run(kept["run_id"]).data.tags["decision"] == "kept the champion"


def test_a_tracking_store_that_goes_down_costs_no_request(stub, tmp_path):
    port = free_port()
    server = [os.path.join(VENV_BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
              "--default-artifact-root", str(tmp_path / "artifacts"), "--port", str(port), "--workers", "1"]
    store = f"http://127.0.0.1:{port}"

    def traces(url: str) -> dict[str, float]:
        return trace_counts(httpx.get(f"{url}/metrics", timeout=30).text)

    def ask(client: httpx.Client, i: int) -> int:
        return client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": f"Question {i}?"}]}).status_code

    # Offline, litellm's import can hang `mlflow server` at start-up without its bundled price map (Makefile);
    # its job runners (seven processes) have nothing to do with this test.
    tracking = running(server, f"{store}/health", child_env(LITELLM_LOCAL_MODEL_COST_MAP="true",
                                                            MLFLOW_DISABLE_TELEMETRY="true",
                                                            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                       tmp_path / "server.log", timeout=120)
    with tracking as tracking_server:
        env = {**store_env(tmp_path, DSPY_LM_API_BASE=stub), "MLFLOW_TRACKING_URI": store}
        with gateway_process(QA, tmp_path, "--trace-flush-timeout", "3", **env) as served, \
                httpx.Client(base_url=served.url, timeout=60) as client:
            url = served.url
            assert [ask(client, i) for i in range(5)] == [200] * 5
            for _ in range(100):  # written while the store is up
                if traces(url).get("written", 0) >= 5:
                    break
                time.sleep(0.2)
            assert traces(url)["written"] >= 5
            os.killpg(tracking_server.pid, signal.SIGKILL)  # the tracking store goes down
            tracking_server.wait(10)
            assert [ask(client, i) for i in range(5, 45)] == [200] * 40  # every request still answered
            assert traces(url)["queued"] == 45
    log = served.log_text()
    queued, written, dropped = map(int, re.search(r"traces: (\d+) queued, (\d+) written, (\d+) dropped", log).groups())
    assert queued == 45 and written + dropped == 45 and dropped >= 40 - 1  # what the store never took is counted
    assert "traces dropped" in log


def test_a_request_refused_before_its_program_ran_names_no_trace(stub, tmp_path):
    async def ask() -> tuple[httpx.Response, httpx.Response]:
        # The trace's fate is not the subject: the stop does not wait for the writer.
        async with asgi_client(traced_app(stub, trace_flush_timeout=0.0), lifespan=True) as client:
            refused = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "assistant", "content": "no user turn"}]})
            answered = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "A question?"}]})
            return refused, answered

    with environment(store_env(tmp_path)):
        refused, answered = asyncio.run(ask())
    assert refused.status_code == 400 and "x-mlflow-trace-id" not in refused.headers
    assert answered.status_code == 200 and answered.headers["x-mlflow-trace-id"].startswith("tr-")


def test_a_trace_sample_of_zero_traces_nothing_and_counts_every_request_sampled_out(stub, tmp_path):
    async def ask() -> tuple[list[httpx.Response], str]:
        async with asgi_client(traced_app(stub, trace_sample=0.0, trace_flush_timeout=0.0), lifespan=True) as client:
            replies = [await client.post("/v1/chat/completions",
                                         json={"messages": [{"role": "user", "content": f"Q{i}?"}]})
                       for i in range(10)]
            return replies, (await client.get("/metrics")).text

    with environment(store_env(tmp_path)):
        replies, text = asyncio.run(ask())
    assert all(r.status_code == 200 and "x-mlflow-trace-id" not in r.headers for r in replies)
    outcomes = trace_counts(text)
    assert outcomes.get("sampled_out") == 10 and not outcomes.get("queued")


SLOW_WRITER = '''import sys, time
if any("spawn_main" in arg for arg in sys.orig_argv) and "resource_tracker" not in " ".join(sys.orig_argv):
    time.sleep(15)  # a child spawned by multiprocessing (the trace writer) starts slowly, as on a busy machine
'''


def test_feedback_on_the_first_answer_waits_for_a_writer_still_starting(stub, tmp_path):
    """The trace writer is a process of its own that imports MLflow: on a busy machine it may take longer to
    start than feedback waits for a trace. The wait counts from the writer's start, so rating the very first
    answer of a fresh gateway is recorded (here the writer takes 15 s to start; feedback waits 10 s for a
    trace once it has)."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_WRITER)
    env = store_env(tmp_path, DSPY_LM_API_BASE=stub, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    with gateway_process(QA, tmp_path, **env) as served, httpx.Client(base_url=served.url, timeout=120) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "First?"}]})
        rated = client.post("/v1/feedback", json={"trace_id": answer.headers["x-mlflow-trace-id"], "value": True},
                            headers={"x-mlflow-feedback-token": answer.headers["x-mlflow-feedback-token"]})
    assert rated.status_code == 200, rated.text
