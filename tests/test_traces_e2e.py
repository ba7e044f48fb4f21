"""Every answer names its trace, and a graceful stop leaves a trace in the store for every answered
request not counted as dropped (a real gateway, the stub LM, a real SQLite tracking store)."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlflow
import pytest

from tests.conftest import store_env
from tests.support.processes import gateway, stub_lm

pytestmark = pytest.mark.slow


def test_answers_name_their_traces_and_a_graceful_stop_flushes_them(tmp_path):
    with stub_lm(tmp_path) as base:
        env = store_env(tmp_path, DSPY_LM_API_BASE=base)
        with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, **env) as url:
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
        log = next(tmp_path.glob("gateway-*.log")).read_text()
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


def test_feedback_is_recorded_as_assessments_on_the_answers_trace_and_bad_feedback_is_refused(tmp_path):
    with stub_lm(tmp_path) as base:
        env = store_env(tmp_path, DSPY_LM_API_BASE=base, GATEWAY_API_KEYS="sk-k")
        keyed = {"Authorization": "Bearer sk-k"}
        with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, **env) as url, \
                httpx.Client(base_url=url, timeout=60, headers=keyed) as client:
            reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Capital?"}]})
            trace_id = reply.headers["x-mlflow-trace-id"]
            # At once: the trace may still be queued for the writer; feedback waits for it.
            given = client.post("/v1/feedback", json={"trace_id": trace_id, "value": False, "rationale": "wrong city",
                                                      "expected": {"answer": "Paris"}, "source": "alice"})
            assert given.status_code == 200, given.text
            refusals = {
                "value": client.post("/v1/feedback", json={"trace_id": trace_id, "value": "yes"}),
                "colour": client.post("/v1/feedback", json={"trace_id": trace_id, "value": 1, "colour": "red"}),
                "expected.city": client.post("/v1/feedback", json={"trace_id": trace_id, "value": True,
                                                                   "expected": {"city": "Paris"}}),
            }
            surrogate = client.post("/v1/feedback", headers={"content-type": "application/json"},
                                    content=b'{"trace_id": "x", "value": true, "expected": {"\\ud800": "x"}}')
            unknown = client.post("/v1/feedback", json={"trace_id": "tr-" + "0" * 32, "value": True})
            without_key = httpx.post(f"{url}/v1/feedback", json={"trace_id": trace_id, "value": True})
    for field, refused in refusals.items():
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    assert "not an output of this program" in refusals["expected.city"].json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "trace_not_found"
    assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
    assert without_key.status_code == 401
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assessments = {a.name: a for a in mlflow.get_trace(trace_id).info.assessments}
    feedback, expectation = assessments["user_feedback"], assessments["expected_outputs"]
    assert feedback.value is False and feedback.rationale == "wrong city" and feedback.source.source_id == "alice"
    assert expectation.value == {"answer": "Paris"}


def test_feedback_without_tracing_says_tracing_is_off(tmp_path):
    with stub_lm(tmp_path) as base, gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, "--no-traces",
                                            DSPY_LM_API_BASE=base) as url:
        reply = httpx.post(f"{url}/v1/feedback", json={"trace_id": "tr-1", "value": True}, timeout=30)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "tracing_off"
    assert "tracing is off" in reply.json()["error"]["message"]


def test_the_export_holds_exactly_the_rated_examples_in_the_data_format(tmp_path):
    import subprocess
    import sys

    from mlflow_dspy.program.datasets import load_examples
    from mlflow_dspy.program.target import open_target
    from tests.support.processes import ROOT

    questions = ["Rated up?", "Corrected?", "Rated down?", "Rated up?", "Expected only?", "Not rated?"]
    verdicts = [{"value": True}, {"value": False, "expected": {"answer": "Fixed"}}, {"value": False},
                {"value": 1}, {"value": True, "expected": {"answer": "Given"}}, None]
    with stub_lm(tmp_path) as base:
        env = store_env(tmp_path, DSPY_LM_API_BASE=base)
        with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, **env) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            for question, verdict in zip(questions, verdicts, strict=True):
                reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]})
                if verdict is not None:
                    given = client.post("/v1/feedback", json={"trace_id": reply.headers["x-mlflow-trace-id"],
                                                              **verdict})
                    assert given.status_code == 200, given.text

    def export(*options: str) -> tuple[dict, list[dict]]:
        out = tmp_path / f"export{len(options)}{options[-1] if options else ''}.jsonl"
        done = subprocess.run([sys.executable, "mlflow_dspy.py", "traces", "export", "dspy-qa", "--out", str(out),
                               "--json", *options], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return json.loads(done.stdout.strip().splitlines()[-1]), rows

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


def test_improve_promotes_a_candidate_that_wins_and_keeps_the_champion_otherwise(tmp_path):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.support.processes import ROOT

    def cli(*args: str) -> dict:
        done = subprocess.run([sys.executable, "mlflow_dspy.py", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    with stub_lm(tmp_path) as base:
        env = store_env(tmp_path, DSPY_LM="openai/stub-echo", DSPY_LM_API_BASE=base, OPENAI_API_KEY="sk-stub")
        cli("log", "qa", "--json")
        subprocess.run([sys.executable, "mlflow_dspy.py", "promote", "--name", "dspy-qa", "--version", "1"], cwd=ROOT,
                       env=env, check=True, capture_output=True, timeout=300)
        with gateway(["-m", "models:/dspy-qa@champion", "--reload-interval", "0.5"], tmp_path, **env) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            for i in range(8):
                reply = client.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]})
                assert client.post("/v1/feedback", json={"trace_id": reply.headers["x-mlflow-trace-id"],
                                                         "value": True}).status_code == 200
            registry = MlflowClient(env["MLFLOW_TRACKING_URI"])
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))

            dry = cli("improve", "dspy-qa", "--from-traces", "--dry-run", "--json")
            assert dry["dry_run"] and dry["examples"] == 8 and (dry["train"], dry["heldout"]) == (6, 2)
            assert len(registry.search_model_versions("name='dspy-qa'")) == 1  # nothing registered
            assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before

            # No score beats another by more than 100 points: the champion is certain to stay.
            kept = cli("improve", "dspy-qa", "--from-traces", "--margin", "100", "--json")
            assert not kept["promote"] and kept["candidate_version"] == "2" and "not more than 100" in kept["why"]
            assert str(registry.get_model_version_by_alias("dspy-qa", "champion").version) == "1"
            # Any candidate beats the champion by more than -101 points: certain to be promoted.
            won = cli("improve", "dspy-qa", "--from-traces", "--margin", "-101", "--json")
            assert won["promote"] and won["candidate_version"] == "3"
            assert str(registry.get_model_version_by_alias("dspy-qa", "champion").version) == "3"
            # The gateway follows the alias: the promoted version answers.
            for _ in range(60):
                answered = client.post("/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "And now?"}]})
                if answered.json()["system_fingerprint"] == "dspy-qa/3":
                    break
                time.sleep(0.5)
            assert answered.json()["system_fingerprint"] == "dspy-qa/3"
    run = registry.get_run(won["run_id"])
    assert run.data.tags["decision"] == "promoted" and run.data.tags["candidate_version"] == "3"
    assert {"champion_heldout_score", "candidate_heldout_score"} <= set(run.data.metrics)
    assert sorted(d.tags[0].value for d in run.inputs.dataset_inputs) == ["heldout", "train"]
    assert registry.get_run(kept["run_id"]).data.tags["decision"] == "kept the champion"


def test_a_tracking_store_that_goes_down_costs_no_request(tmp_path):
    import os
    import signal

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.processes import VENV_BIN, child_env, free_port, running

    port = free_port()
    server = [os.path.join(VENV_BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
              "--default-artifact-root", str(tmp_path / "artifacts"), "--port", str(port), "--workers", "1"]
    store = f"http://127.0.0.1:{port}"

    def traces(url: str) -> dict[str, float]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "mlflow_dspy_traces" for s in f.samples if s.name.endswith("_total")}

    def ask(client: httpx.Client, i: int) -> int:
        return client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": f"Question {i}?"}]}).status_code

    with stub_lm(tmp_path) as base:
        # Offline, litellm's import can hang `mlflow server` at start-up without its bundled price map (Makefile).
        tracking = running(server, f"{store}/health", child_env(LITELLM_LOCAL_MODEL_COST_MAP="true"),
                           tmp_path / "server.log", timeout=120)
        with tracking as tracking_server:
            env = {**store_env(tmp_path, DSPY_LM_API_BASE=base), "MLFLOW_TRACKING_URI": store}
            with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, "--trace-flush-timeout", "3",
                         **env) as url, httpx.Client(base_url=url, timeout=60) as client:
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
        log = next(tmp_path.glob("gateway-*.log")).read_text()
    queued, written, dropped = map(int, re.search(r"traces: (\d+) queued, (\d+) written, (\d+) dropped", log).groups())
    assert queued == 45 and written + dropped == 45 and dropped >= 40 - 1  # what the store never took is counted
    assert "traces dropped" in log


def test_a_request_refused_before_its_program_ran_names_no_trace(tmp_path):
    with stub_lm(tmp_path) as base:
        env = store_env(tmp_path, DSPY_LM_API_BASE=base)
        with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, **env) as url:
            refused = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "assistant", "content": "no user turn"}]})
            answered = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "A question?"}]})
    assert refused.status_code == 400 and "x-mlflow-trace-id" not in refused.headers
    assert answered.status_code == 200 and answered.headers["x-mlflow-trace-id"].startswith("tr-")


def test_a_trace_sample_of_zero_traces_nothing_and_counts_every_request_sampled_out(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    with stub_lm(tmp_path) as base:
        env = store_env(tmp_path, DSPY_LM_API_BASE=base)
        with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, "--trace-sample", "0", **env) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            replies = [client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Q{i}?"}]})
                       for i in range(10)]
            text = client.get("/metrics").text
    assert all(r.status_code == 200 and "x-mlflow-trace-id" not in r.headers for r in replies)
    outcomes = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "mlflow_dspy_traces" for s in f.samples if s.name.endswith("_total")}
    assert outcomes.get("sampled_out") == 10 and not outcomes.get("queued")
