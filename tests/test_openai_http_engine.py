"""The OpenAI-compatible HTTP engine: wire format, DSPy error classes, streams, credentials."""

import asyncio
import pickle

import cloudpickle
import dspy
import httpx
import pytest
from dspy import lm15
from dspy.utils.exceptions import LMProviderError, LMRateLimitError, LMServerError

from mlflow_dspy.lm_engine import http1, openai_http
from mlflow_dspy.lm_engine.openai_http import (
    MAX_RETRY_WAIT,
    TRANSPORT_ENV,
    AsyncOpenAIHTTPEngine,
    OpenAIHTTPEngine,
    _StreamParser,
    close_connections,
    error_for,
    response_from,
    retry_after,
)
from mlflow_dspy.lm_engine.select import build_lm
from tests.support.processes import stub_requests


def ask(lm, question: str) -> dspy.Prediction:
    with dspy.context(lm=lm):
        return dspy.Predict("question -> answer")(question=question)


def test_sync_and_async_calls_reach_the_server_with_the_key_from_the_environment(stub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    lm = build_lm("openai/stub", stub)
    assert ask(lm, "sync?").answer == "answer: sync?"

    async def acall():
        try:
            with dspy.context(lm=lm):
                return await dspy.Predict("question -> answer").acall(question="async?")
        finally:
            await close_connections()

    assert asyncio.run(acall()).answer == "answer: async?"
    seen = stub_requests(stub)[-2:]
    assert [r["authorization"] for r in seen] == ["Bearer sk-from-env"] * 2
    assert seen[-1]["body"]["model"] == "stub"  # the provider prefix stays on our side


def test_pickled_engine_holds_no_key_and_no_credentials_of_the_url(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-pickled")
    lm = build_lm("openai/stub", "http://user:pa55word@127.0.0.1:9/v1?api_key=qs-secret")
    blob = cloudpickle.dumps(lm)
    for secret in (b"sk-never-pickled", b"pa55word", b"qs-secret"):
        assert secret not in blob
    restored = pickle.loads(blob)
    assert restored.engine.url == "http://127.0.0.1:9/v1/chat/completions"


def test_a_server_error_is_retried_then_reported_as_dspys_server_error(stub):
    lm = build_lm("openai/stub", stub)
    lm.num_retries = 1  # one retry after 1 s keeps the test short
    before = httpx.get(stub.replace("/v1", "/_stats")).json()["total"]
    with pytest.raises(LMServerError):
        ask(lm, "[fail500] boom")
    assert httpx.get(stub.replace("/v1", "/_stats")).json()["total"] - before == 2  # first attempt + one retry


def test_a_refused_connection_is_a_retryable_transport_error():
    lm = build_lm("openai/stub", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    lm.num_retries = 0
    with pytest.raises(dspy.utils.exceptions.LMTransportError):
        ask(lm, "anyone?")


def test_short_retry_after_is_retried_long_one_goes_back_to_the_client():
    short = error_for(429, b'{"error": {"message": "slow down"}}', {"retry-after": "1"})
    assert isinstance(short, lm15.RateLimitError) and short.retry_after == 1.0
    long = error_for(429, b"{}", {"retry-after": str(int(MAX_RETRY_WAIT) + 60)})
    assert not isinstance(long, lm15.RateLimitError) and long.status == 429 and long.retry_after > MAX_RETRY_WAIT
    # DSPy's own projection keeps them apart: only the short one is retryable.
    from dspy.clients.errors import wrap_error
    from dspy.utils.exceptions import is_retryable_lm_error

    assert isinstance(wrap_error(short, model="m"), LMRateLimitError)
    assert is_retryable_lm_error(wrap_error(short, model="m"))
    projected = wrap_error(long, model="m")
    assert isinstance(projected, LMProviderError) and not is_retryable_lm_error(projected)


@pytest.mark.parametrize(("status", "body", "kind"), [
    (401, b'{"error": {"message": "bad key"}}', lm15.AuthError),
    (400, b'{"error": {"message": "too long", "code": "context_length_exceeded"}}', lm15.ContextLengthError),
    (400, b"not json", lm15.InvalidRequestError),
    (503, b"", lm15.ServerError),
    (504, b"", lm15.TimeoutError),
])
def test_http_failures_map_to_the_errors_dspy_understands(status, body, kind):
    assert isinstance(error_for(status, body, {}), kind)


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after("3") == 3.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after("soon") is None


def test_a_body_that_is_not_a_chat_completion_is_a_server_error():
    with pytest.raises(lm15.ServerError, match="not a chat completion"):
        response_from({"choices": []})
    assert response_from({"choices": [{"message": {"content": "hi"}, "finish_reason": "length"}]}).finish_reason \
        == "length"


def test_a_stream_that_stops_before_finishing_raises_instead_of_ending_quietly():
    parser = _StreamParser()
    events = parser.events('data: {"choices": [{"delta": {"content": "Par"}}]}')
    assert events[0].delta.text == "Par"
    with pytest.raises(lm15.ServerError, match="stopped before"):
        parser.end()
    parser.events('data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}')
    assert parser.end().finish_reason == "stop"


@pytest.mark.parametrize("transport", ["", "httpx"])  # "": http1, the default without a proxy
def test_streaming_from_the_server_yields_the_text_and_usage(stub, monkeypatch, transport):
    monkeypatch.setenv(TRANSPORT_ENV, transport)
    engine = AsyncOpenAIHTTPEngine("openai/stub", stub)
    request = lm15.Request(model="openai/stub", messages=(lm15.Message.user("[[ ## question ## ]]\nhi"),))

    async def collect():
        try:
            return [event async for event in engine.stream(request)]
        finally:
            await engine.aclose()

    events = asyncio.run(collect())
    text = "".join(e.delta.text for e in events if e.type == "delta")
    assert text.startswith("[[ ## answer ## ]]\nanswer: hi")
    assert events[-1].type == "end" and events[-1].usage.output_tokens > 0


def test_sync_engine_maps_a_cut_connection_to_a_transport_error(stub):
    engine = OpenAIHTTPEngine("openai/stub", stub)
    request = lm15.Request(model="openai/stub", messages=(lm15.Message.user("[[ ## question ## ]]\n[cut]"),))
    with pytest.raises(lm15.TransportError):
        engine.complete(request)


@pytest.mark.parametrize("engine", ["sync", "async http1", "async httpx"])
def test_an_answer_larger_than_the_cap_is_refused_as_a_transport_error(stub, monkeypatch, engine):
    monkeypatch.setattr(openai_http, "MAX_BODY_BYTES", 100)
    monkeypatch.setattr(http1, "MAX_BODY_BYTES", 100)
    monkeypatch.setenv(TRANSPORT_ENV, "httpx" if engine == "async httpx" else "")
    request = lm15.Request(model="openai/stub", messages=(lm15.Message.user("[[ ## question ## ]]\nlong?"),))
    with pytest.raises(lm15.TransportError, match="larger than 100 bytes"):
        if engine == "sync":
            OpenAIHTTPEngine("openai/stub", stub).complete(request)
        else:
            async def call():
                engine_ = AsyncOpenAIHTTPEngine("openai/stub", stub)
                try:
                    return await engine_.complete(request)
                finally:
                    await engine_.aclose()

            asyncio.run(call())
