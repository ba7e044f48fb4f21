"""Feedback bound to its caller, with real processes (issue 23, item 5): a gateway with two API keys and a
SQLite store, where one key cannot rate the other's answers; a real `mlflow server` that stops, which
feedback answers with a 503 in seconds (it hung 115 s); two workers, whose tokens are good on either.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from mlflow import MlflowClient

from tests.support.cli import store_env
from tests.support.processes import free_port, gateway_process
from tests.test_trace_outage import tracking_server

QA = ["--program", "qa", "--lm", "openai/stub-echo"]
TOKEN = "x-mlflow-feedback-token"

pytestmark = pytest.mark.slow


def ask(client: httpx.Client, question: str) -> httpx.Response:
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]})
    assert reply.status_code == 200, reply.text
    return reply


def test_another_key_cannot_rate_someone_elses_answer(stub, tmp_path):
    env = store_env(tmp_path, DSPY_LM_API_BASE=stub, GATEWAY_API_KEYS="alice:sk-alice-1,bob:sk-bob-2")
    with gateway_process(QA, tmp_path, **env) as served, \
            httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": "Bearer sk-alice-1"}) as alice, \
            httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": "Bearer sk-bob-2"}) as bob:
        reply = ask(alice, "Who wrote Hamlet?")
        trace_id, token = reply.headers["x-mlflow-trace-id"], reply.headers[TOKEN]
        label = {"trace_id": trace_id, "value": False, "expected": {"answer": "ATTACKER LABEL"}}
        # Bob knows the trace id, and even Alice's token: neither lets him rate her answer.
        without = bob.post("/v1/feedback", json=label)
        with_hers = bob.post("/v1/feedback", json=label, headers={TOKEN: token})
        # His own answer's token names his own trace only.
        his = ask(bob, "Who wrote Faust?").headers[TOKEN]
        with_his = bob.post("/v1/feedback", json=label, headers={TOKEN: his})
        # Alice rates her own; a source she claims is refused, the one recorded is her key's name.
        claimed = alice.post("/v1/feedback", json={"trace_id": trace_id, "value": True, "source": "bob"},
                             headers={TOKEN: token})
        given = alice.post("/v1/feedback", json={"trace_id": trace_id, "value": True}, headers={TOKEN: token})
    for refused in (without, with_hers, with_his):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "feedback_token_invalid"
    assert "no x-mlflow-feedback-token header" in without.json()["error"]["message"]
    assert "only the caller that got an answer may rate it" in with_hers.json()["error"]["message"]
    assert claimed.status_code == 400 and claimed.json()["error"]["param"] == "source"
    assert given.status_code == 200, given.text
    assessments = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_trace(trace_id).info.assessments
    assert [(a.name, a.value, a.source.source_id) for a in assessments] == [("user_feedback", True, "alice")]


def test_feedback_answers_503_within_seconds_once_the_tracking_store_is_down(stub, tmp_path):
    with ExitStack() as stack:
        store = stack.enter_context(ExitStack())
        url = store.enter_context(tracking_server(tmp_path, free_port()))
        env = {**store_env(tmp_path, DSPY_LM_API_BASE=stub), "MLFLOW_TRACKING_URI": url}
        served = stack.enter_context(gateway_process(QA, tmp_path, **env))
        client = stack.enter_context(httpx.Client(base_url=served.url, timeout=60))
        before = ask(client, "Asked before the outage?")
        given = client.post("/v1/feedback", headers={TOKEN: before.headers[TOKEN]},
                            json={"trace_id": before.headers["x-mlflow-trace-id"], "value": True,
                                  "expected": {"answer": "yes"}})
        assert given.status_code == 200, given.text
        stored = MlflowClient(url).get_trace(before.headers["x-mlflow-trace-id"]).info.assessments
        assert {(a.name, a.source.source_id) for a in stored} == {("user_feedback", "anonymous"),
                                                                   ("expected_outputs", "anonymous")}
        during = ask(client, "Asked during the outage?")  # the gateway answers; its trace waits in the queue
        store.close()  # the store goes down (SIGKILL)
        timings = []
        for _ in range(2):
            began = time.monotonic()
            down = client.post("/v1/feedback", headers={TOKEN: during.headers[TOKEN]}, timeout=30,
                               json={"trace_id": during.headers["x-mlflow-trace-id"], "value": False})
            timings.append(time.monotonic() - began)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "tracking_store_unavailable"
            assert 1 <= int(down.headers["retry-after"]) <= 10
    # It hung 115 s in MLflow's retries; now one try, and 503 at once for a moment after a failure.
    assert max(timings) < 10, timings


def test_an_answers_token_is_good_on_every_worker_of_a_gateway(stub, tmp_path):
    env = store_env(tmp_path, DSPY_LM_API_BASE=stub)  # no MLFLOW_DSPY_FEEDBACK_SECRET: the launcher makes one
    with gateway_process([*QA, "--workers", "2"], tmp_path, **env) as served, \
            httpx.Client(base_url=served.url, timeout=60) as client:
        replies = [ask(client, f"Question {i}?") for i in range(12)]

        def rate(reply: httpx.Response) -> int:
            with httpx.Client(base_url=served.url, timeout=60) as fresh:  # a new connection: any worker
                return fresh.post("/v1/feedback", headers={TOKEN: reply.headers[TOKEN]},
                                  json={"trace_id": reply.headers["x-mlflow-trace-id"], "value": True}).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(rate, replies))
        log = served.log_text()
    assert statuses == [200] * len(replies), statuses
    assert "MLFLOW_DSPY_FEEDBACK_SECRET is not set" in log
