"""Feedback is bound to its caller and bounded (issue 23, item 5; finding 7).

Unit: the tokens, the buckets and the keys' names. With the gateway app in process (started as a server
starts it, its trace writer a process of its own, a real SQLite store): what /v1/feedback refuses, its rate,
its in-flight cap, and that it never loads the trace. With real processes (tests/test_feedback_e2e.py):
another key cannot rate someone else's answer, a stopped tracking store is a fast 503, several workers
share one secret.
"""

from __future__ import annotations

import asyncio
import json
import time

import mlflow
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dspy.gateway import feedback as feedback_module
from mlflow_dspy.gateway.config import GatewayConfig, SettingProblem, named_keys
from mlflow_dspy.gateway.feedback import MAX_TEXT, TokenBuckets
from mlflow_dspy.gateway.feedback_tokens import FeedbackTokens, SecretProblem
from tests.support.cli import environment, store_env
from tests.support.inprocess import asgi_client, gateway_app, program_host

SECRET = "s" * 40
TOKEN = "x-mlflow-feedback-token"


# -- unit: tokens, buckets, key names ---------------------------------------------------------------------------
@pytest.mark.unit
def test_a_token_is_good_only_for_its_trace_and_its_caller_and_names_what_answered():
    tokens = FeedbackTokens([SECRET])
    token = tokens.sign("tr-" + "a" * 32, "alice", "dspy-qa", "dspy-qa/3")
    assert tokens.check(token, "tr-" + "a" * 32, "alice") == ("dspy-qa", "dspy-qa/3")
    assert tokens.check(token, "tr-" + "a" * 32, "bob") is None  # another caller
    assert tokens.check(token, "tr-" + "b" * 32, "alice") is None  # another trace
    version, _, mac = token.split(".")
    other = tokens.sign("tr-" + "a" * 32, "alice", "dspy-qa", "dspy-qa/1").split(".")[1]
    forged = f"{version}.{other}.{mac}"
    assert tokens.check(forged, "tr-" + "a" * 32, "alice") is None  # another version claimed, same mac
    assert tokens.check(token, "tr-" + "a" * 32, "alice") is not None
    assert FeedbackTokens(["t" * 40]).check(token, "tr-" + "a" * 32, "alice") is None  # another secret
    for junk in ("", "fb1", "fb1..", "fb1.!!.!!", "x" * 2000, "fb2." + token[4:]):
        assert tokens.check(junk, "tr-" + "a" * 32, "alice") is None


@pytest.mark.unit
def test_rotating_the_secret_keeps_the_previous_ones_tokens_good():
    old = FeedbackTokens([SECRET]).sign("tr-" + "a" * 32, "alice", "m", "v")
    rotated = FeedbackTokens(["n" * 40, SECRET])
    assert rotated.check(old, "tr-" + "a" * 32, "alice") == ("m", "v")
    assert FeedbackTokens(["n" * 40]).check(rotated.sign("tr-" + "a" * 32, "alice", "m", "v"),
                                            "tr-" + "a" * 32, "alice") == ("m", "v")


@pytest.mark.unit
def test_a_short_feedback_secret_is_refused_and_none_makes_one_with_a_warning(caplog):
    with pytest.raises(SecretProblem, match="at least 32 characters"):
        FeedbackTokens.from_env({"MLFLOW_DSPY_FEEDBACK_SECRET": "short"})
    made = FeedbackTokens.from_env({})
    assert "MLFLOW_DSPY_FEEDBACK_SECRET is not set" in caplog.text
    assert made.check(made.sign("tr-1", "a", "m", "v"), "tr-1", "a")


@pytest.mark.unit
def test_each_caller_gets_its_own_bucket_and_waits_once_it_is_empty():
    buckets = TokenBuckets(rate=2, burst=3)
    assert [buckets.take("alice") for _ in range(3)] == [0, 0, 0]
    wait = buckets.take("alice")
    assert 0 < wait <= 0.5  # one more at 2 a second
    assert buckets.take("bob") == 0  # another key is not held back


@pytest.mark.unit
def test_api_keys_are_named_by_their_name_or_a_fingerprint_and_two_of_one_name_are_refused():
    keys = named_keys(("alice:sk-1", "sk-2", "not a name:sk-3"))
    assert [k.name for k in keys] == ["alice", keys[1].name, keys[2].name]
    assert keys[0].key == b"sk-1" and keys[1].key == b"sk-2" and keys[2].key == b"not a name:sk-3"
    assert keys[1].name.startswith("key-") and len(keys[1].name) == 12 and "sk-2" not in keys[1].name
    for refused in (("alice:sk-1", "alice:sk-2"), ("anonymous:sk-1",)):
        with pytest.raises(SettingProblem, match="name of its own"):
            named_keys(refused)
    with pytest.raises(SettingProblem):
        GatewayConfig(program="qa", api_keys=("a:1", "a:2")).check()


# -- the app in process ------------------------------------------------------------------------------------------
def traced_app(stub: str, **config):
    return gateway_app(host=program_host("qa", api_base=stub), traces=True, **config)


async def answered(client, question: str = "Capital of France?", written: int = 1):
    """An answer's trace id and the header to rate it, once `written` traces are in the store (the writer, a
    process of its own, may take a while to start on a loaded machine: these tests are not about waiting)."""
    reply = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]})
    assert reply.status_code == 200, reply.text
    for _ in range(600):
        metrics = (await client.get("/metrics")).text
        if any(f.name == "mlflow_dspy_traces" and s.labels.get("outcome") == "written" and s.value >= written
               for f in text_string_to_metric_families(metrics) for s in f.samples):
            break
        await asyncio.sleep(0.2)
    return reply.headers["x-mlflow-trace-id"], {TOKEN: reply.headers[TOKEN]}


def test_feedback_out_of_bounds_is_refused_naming_the_field_and_the_store_stays_searchable(stub, tmp_path):
    huge = 9 * 10 ** 399  # a 400-digit integer: stored, it broke mlflow.search_traces for the whole experiment
    refused = {
        "value": [{"value": huge}, {"value": -huge}, {"value": 1_000_001}, {"value": "yes"}, {"value": None}],
        "rationale": [{"value": True, "rationale": "r" * 10_001}],
        "expected.answer": [{"value": False, "expected": {"answer": "a" * (MAX_TEXT + 1)}},
                            {"value": False, "expected": {"answer": 5}},  # not of the output's type (str)
                            {"value": False, "expected": {"answer": ["a", ["b", ["c", ["d"]]]]}}],
        "expected": [{"value": False, "expected": {}}],
        "source": [{"value": True, "source": "alice"}],
    }
    raw = {  # what json.dumps cannot write: NaN, Infinity, nesting 900 deep, 900 KB of text
        "value": [b'"value": NaN', b'"value": Infinity', b'"value": -Infinity', b'"value": 1e400'],
        "expected.answer[0]": [b'"value": true, "expected": {"answer": [' + b"[" * 900 + b"]" * 900 + b"]}"],
        "expected.answer.": [b'"value": true, "expected": {"answer": "' + b"x" * 900_000 + b'"}'],
    }

    async def scenario():
        app = traced_app(stub)
        async with asgi_client(app, lifespan=True) as client:
            trace_id, token = await answered(client)
            answers = {field: [await client.post("/v1/feedback", headers=token, json={"trace_id": trace_id, **body})
                               for body in bodies] for field, bodies in refused.items()}
            for field, bodies in raw.items():
                answers[field] = [await client.post(
                    "/v1/feedback", headers={"content-type": "application/json", **token},
                    content=b'{"trace_id": "' + trace_id.encode() + b'", ' + body + b"}") for body in bodies]
            kept = await client.post("/v1/feedback", headers=token,
                                     json={"trace_id": trace_id, "value": 0.5, "expected": {"answer": "Paris"}})
            return trace_id, answers, kept

    env = store_env(tmp_path, MLFLOW_DSPY_FEEDBACK_RATE="1000", MLFLOW_DSPY_FEEDBACK_BURST="1000")
    with environment(env):
        trace_id, answers, kept = asyncio.run(scenario())
    for field, replies in answers.items():
        for reply in replies:
            assert reply.status_code == 400, (field, reply.text[:300])
            error = reply.json()["error"]
            assert (error["param"] or "").startswith(field.rstrip(".")), (field, error)
            assert "Traceback" not in reply.text and len(reply.text) < 2000
    assert "finite number from -1000000 to 1000000" in answers["value"][0].json()["error"]["message"]
    assert "not a str" in answers["expected.answer"][1].json()["error"]["message"]
    assert kept.status_code == 200, kept.text
    # Only the one in bounds was stored, and the experiment's traces can be searched as a whole.
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    experiment = MlflowClient().get_experiment_by_name("mlflow-dspy").experiment_id
    traces = mlflow.search_traces(locations=[experiment], return_type="list")
    assessments = [a for t in traces for a in t.info.assessments]
    assert sorted((a.name, json.dumps(a.value)) for a in assessments) == [
        ("expected_outputs", '{"answer": "Paris"}'), ("user_feedback", "0.5")]
    assert {t.info.trace_id for t in traces} == {trace_id}


def test_feedback_that_is_not_json_gets_415(stub):
    bodies = [({"content-type": "text/plain"}, b'{"trace_id": "x", "value": true}'),
              ({"content-type": "application/x-www-form-urlencoded"}, b"trace_id=x&value=true"),
              ({"content-type": "multipart/form-data; boundary=b"}, b'--b\r\nContent-Disposition: form-data; '
               b'name="value"\r\n\r\ntrue\r\n--b--\r\n'),
              ({"content-type": "application/json", "content-encoding": "gzip"}, b'{"trace_id": "x", "value": true}'),
              ({}, b'{"trace_id": "x", "value": true}')]

    async def scenario():
        async with asgi_client(gateway_app(stub)) as client:
            return [await client.post("/v1/feedback", headers=headers, content=body) for headers, body in bodies]

    for reply in asyncio.run(scenario()):
        assert reply.status_code == 415, reply.text
        assert reply.json()["error"]["code"] == "unsupported_media_type"


def test_feedback_past_a_keys_rate_gets_429_with_retry_after_and_other_keys_are_not_held_back(stub, tmp_path):
    async def scenario():
        app = traced_app(stub, api_keys=("alice:sk-a", "bob:sk-b"), feedback_rate=0.2, feedback_burst=2)
        async with asgi_client(app, lifespan=True, Authorization="Bearer sk-a") as alice, \
                asgi_client(app, Authorization="Bearer sk-b") as bob:
            trace_id, token = await answered(alice)
            bob_trace, bob_token = await answered(bob, written=2)
            posts = [await alice.post("/v1/feedback", headers=token, json={"trace_id": trace_id, "value": True})
                     for _ in range(3)]
            # Past its rate even a body that is not JSON is refused before it is read.
            garbage = await alice.post("/v1/feedback", headers={"content-type": "application/json", **token},
                                       content=b"{")
            others = await bob.post("/v1/feedback", headers=bob_token, json={"trace_id": bob_trace, "value": True})
            return posts, garbage, others

    with environment(store_env(tmp_path)):
        posts, garbage, others = asyncio.run(scenario())
    assert [p.status_code for p in posts] == [200, 200, 429], [p.text for p in posts]
    limited = posts[2]
    assert limited.json()["error"]["code"] == "feedback_rate_limited" and "alice" in limited.json()["error"]["message"]
    assert 1 <= int(limited.headers["retry-after"]) <= 5
    assert garbage.status_code == 429
    assert others.status_code == 200, others.text


def test_feedback_never_loads_the_trace_and_past_its_in_flight_cap_gets_429(stub, tmp_path, monkeypatch):
    # Loading the trace (its spans and every assessment on it) cost 0.05 s fresh and 0.37 s at 2,800 assessments.
    def loaded(*args, **kwargs):
        raise AssertionError("feedback loaded the trace")

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracing.client import TracingClient

    for owner, name in ((MlflowClient, "get_trace"), (TracingClient, "get_trace"), (TracingClient, "get_trace_info"),
                        (SqlAlchemyStore, "get_trace"), (SqlAlchemyStore, "get_trace_info")):
        monkeypatch.setattr(owner, name, loaded)
    monkeypatch.setattr(feedback_module, "WAIT_FOR_WRITE", 1.5)

    async def scenario():
        app = traced_app(stub, feedback_in_flight=1)
        async with asgi_client(app, lifespan=True) as client:
            trace_id, token = await answered(client)
            given = await client.post("/v1/feedback", headers=token, json={"trace_id": trace_id, "value": True,
                                                                          "expected": {"answer": "Paris"}})
            # A valid token for an answer whose trace is never written: its post waits for it, holding the one slot.
            never = "tr-" + "f" * 32
            waiting = {TOKEN: app.feedback.tokens.sign(never, "anonymous", "dspy-qa", app.models.default.fingerprint)}
            began = time.monotonic()
            first = asyncio.ensure_future(client.post("/v1/feedback", headers=waiting,
                                                      json={"trace_id": never, "value": True}))
            await asyncio.sleep(0.3)
            second = await client.post("/v1/feedback", headers=token, json={"trace_id": trace_id, "value": False})
            return given, second, await first, time.monotonic() - began

    with environment(store_env(tmp_path)):
        given, busy, missing, waited = asyncio.run(scenario())
    assert given.status_code == 200, given.text
    assert len(given.json()["assessments"]) == 2 and given.json()["source"] == "anonymous"
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trace_not_found"
    assert waited >= 1.5


def test_the_feedback_body_is_documented_in_openapi(stub):
    async def scenario():
        async with asgi_client(gateway_app(stub)) as client:
            return (await client.get("/openapi.json")).json()

    operation = asyncio.run(scenario())["paths"]["/v1/feedback"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"trace_id", "value", "rationale", "expected"}
    assert {"403", "415", "429", "503"} <= set(operation["responses"])
    assert json.dumps(schema).count("source") == 0
