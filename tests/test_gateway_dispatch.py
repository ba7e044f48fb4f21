"""The program routes answer the same served directly (the speed-up: `Gateway.direct`, the default) and through
FastAPI's routing (`--no-speedups`: MLFLOW_DSPY_SPEEDUPS=0 when the app is made), status, headers and body, over
one corpus of 300-odd requests: the malformed corpus on three routes, and chats, streams, Responses, typed
/predict, /invocations and the open routes, good and bad. And every answer is well formed: no 5xx but the LM's
502, an error is an OpenAI error object (or MLflow's, where /invocations answers a program's failure as
`mlflow models serve` does), a stream's events are JSON, nothing leaks a traceback. In process (DummyLM)."""

from __future__ import annotations

import asyncio
import json
import re

import dspy
import httpx
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import Gateway, GatewayConfig, create_app
from mlflow_dspy.internals import SPEEDUPS_ENV
from mlflow_dspy.runtime.host import ProgramHost
from tests.malformed import corpus
from tests.support.examples import example_chat

ANSWERS = {
    "What is 2 + 2?": {"reasoning": "two and two", "answer": "4"},
    "Capital of Peru?": {"reasoning": "geography", "answer": "Lima"},
}
USER = [{"role": "user", "content": "What is 2 + 2?"}]
UNKNOWN = [{"role": "user", "content": "unknown question"}]
IDS = re.compile(r"(chatcmpl|resp|msg|rs|req|tr)[-_][0-9a-f]{16,32}")
TIMES = re.compile(r'"(created|created_at|completed_at)": ?\d+')
JSON = {"Content-Type": "application/json"}
PROGRAM_ROUTES = ("/v1/chat/completions", "/invocations", "/predict", "/v1/responses", "/predict/stream")
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}


def normalized(text: str) -> str:
    """Ids and times, which differ between any two answers, made equal."""
    return TIMES.sub(r'"\1": 0', IDS.sub(r"\1-ID", text))


def requests() -> list[tuple[str, bytes | None, dict[str, str]]]:
    """(route, body, headers): None for a GET."""
    sent: list[tuple[str, bytes | None, dict[str, str]]] = []
    for case in corpus():
        headers = dict(case.headers) | ({"Content-Type": case.content_type} if case.content_type else {})
        sent += [(route, case.body, headers) for route in PROGRAM_ROUTES[:3]]

    def post(route: str, *bodies: dict) -> None:
        sent.extend((route, json.dumps(body).encode(), JSON) for body in bodies)

    post("/v1/chat/completions",
         {"messages": USER}, {"messages": USER, "stream": True},
         {"messages": USER, "stream": True, "stream_options": {"include_usage": True}},
         {"messages": USER, "max_tokens": 3}, {"messages": USER, "max_tokens": 3, "stream": True},
         {"messages": UNKNOWN, "max_tokens": 5}, {"messages": UNKNOWN, "max_tokens": 5, "stream": True},
         {"messages": UNKNOWN}, {"messages": UNKNOWN, "stream": True},
         {"messages": USER, "response_format": {"type": "json_object"}},
         {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
         {"messages": USER, "stream": True, "response_format": {"type": "json_schema", "json_schema": {
             "name": "a", "schema": {"type": "object", "properties": {"answer": {"type": "string"},
                                                                      "reasoning": {"type": "string"}}}}}},
         {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
             "name": "a", "schema": {"type": "object", "properties": {"x": {"type": "string"}}}}}},
         {"messages": [{"role": "system", "content": "be brief"}, *USER]},
         {"messages": [*USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Capital of Peru?"}]},
         {"messages": USER, "n": 2}, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
         {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
         {"model": "nope", "messages": USER}, {"model": "qa", "messages": USER},
         {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]},
         {"messages": [{"role": "user", "content": "   "}]}, {"messages": [{"role": "tool", "content": "x"}]})
    post("/v1/responses",
         {"input": "What is 2 + 2?"}, {"input": "What is 2 + 2?", "stream": True},
         {"input": "unknown question", "max_output_tokens": 5},
         {"input": "unknown question", "max_output_tokens": 5, "stream": True},
         {"input": "unknown question"}, {"input": "unknown question", "stream": True},
         {"instructions": "be kind", "input": [{"role": "user", "content": "What is 2 + 2?"}]},
         {"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is 2 + 2?"}]},
                    {"type": "reasoning", "summary": []}]},
         {"input": [{"role": "wizard", "content": "x"}]}, {"input": [{"role": 5, "content": "x"}]},
         {"input": [{"content": "x"}]}, {"input": [{"role": "user"}]}, {"input": [{"role": "user", "content": 5}]},
         {"input": [{"role": "user", "content": [5]}]}, {"input": [{"role": "user", "content": [{"text": "x"}]}]},
         {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
         {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
         {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "y": 1}]}]},
         {"input": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
         {"input": [{"role": "user", "content": "x", "extra": 1}]},
         {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
         {"input": [{"type": "item_reference", "id": "msg_1"}]}, {"input": [{"type": "web"}]},
         {"input": [{"type": 5}]}, {"input": [5]}, {"input": 5}, {"input": []}, {},
         {"input": [{"role": "system", "content": "x"}]},
         {"input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         {"input": [{"role": "user", "content": ""}]},
         {"input": "hi", "text": {"format": {"type": "json_object"}}}, {"input": "hi", "tools": [{"a": 1}]})
    for body in ({"text": "What is 2 + 2?"}, {"question": "What is 2 + 2?"}, {"text": " "}, {"text": ""},
                 {"question": 5}, {"question": "unknown question"}, {"text": "x", "extra": 1}):
        post("/predict", body)
        post("/predict/stream", body)
    post("/invocations",
         {"messages": USER}, {"messages": USER, "max_tokens": 3}, {"messages": UNKNOWN, "max_tokens": 5},
         {"messages": UNKNOWN}, {"dataframe_records": [{"messages": USER}]}, {"inputs": [{"messages": USER}]},
         {"messages": USER, "model": "other"})
    sent += [(route, None, {}) for route in ("/v1/models", "/v1/models/qa", "/v1/models/nope", "/ready", "/health",
                                            "/nope")]
    return sent


def make_app() -> Gateway:
    host = ProgramHost(example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")
    return create_app(GatewayConfig(max_characters=2000, traces=False), host=host)


async def answers(app: Gateway) -> list[tuple[int, dict[str, str], str, str]]:
    """(status, headers but the request id and length, content type, body) of each request, normalized."""
    seen = []
    # Through FastAPI, a handled error still reaches Starlette's outermost middleware, which re-raises it after
    # the answer has left (for the server's log): the answer is what is compared here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://g") as client:
        for route, body, headers in requests():
            reply = await (client.get(route) if body is None else client.post(route, content=body, headers=headers))
            shown = {k: normalized(v) for k, v in reply.headers.items()
                     if k not in ("x-request-id", "content-length", "date")}
            seen.append((reply.status_code, shown, reply.headers.get("content-type", ""), normalized(reply.text)))
    return seen


@pytest.fixture(scope="module")
def both(monkeypatch_module) -> tuple[list, list]:
    monkeypatch_module.delenv(SPEEDUPS_ENV, raising=False)
    direct = make_app()
    monkeypatch_module.setenv(SPEEDUPS_ENV, "0")
    routed = make_app()  # the switch is read when the app is made
    monkeypatch_module.delenv(SPEEDUPS_ENV)
    assert {path for _, path in direct.direct} >= {"/v1/chat/completions", "/v1/responses", "/invocations",
                                                   "/predict", "/predict/stream"}
    assert routed.direct == {}
    return asyncio.run(answers(direct)), asyncio.run(answers(routed))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_corpus_is_large_and_reaches_every_program_route():
    sent = requests()
    assert len(sent) >= 300
    assert set(PROGRAM_ROUTES) <= {route for route, _, _ in sent}


# Bodies nested too deep for Python's JSON reader: served directly they are "not valid JSON"; through FastAPI,
# its own "There was an error parsing the body" (both a 400 invalid_request_error). Pinned apart, below.
TOO_DEEP = {case.body for case in corpus() if case.name.startswith("nesting")}


def differences(both, deep: bool) -> list:
    direct, routed = both
    return [(route, (body or b"")[:80], a, b) for (route, body, _), a, b in zip(requests(), direct, routed, strict=True)
            if a != b and (body in TOO_DEEP) == deep]


def test_served_directly_or_through_fastapis_routing_every_answer_is_the_same(both):
    assert not differences(both, deep=False), differences(both, deep=False)[:3]


@pytest.mark.xfail(strict=True, reason="through FastAPI, a body nested too deep is 'There was an error parsing the "
                                       "body', served directly 'the request body is not valid JSON'")
def test_a_body_nested_too_deep_is_worded_the_same_both_ways(both):
    direct, routed = both
    deep = [(a, b) for (_, body, _), a, b in zip(requests(), direct, routed, strict=True) if body in TOO_DEEP]
    assert deep and all(a[0] == b[0] == 400 for a, b in deep)  # a 400 either way
    assert not differences(both, deep=True), differences(both, deep=True)[:2]


def test_every_answer_is_well_formed(both):
    direct, _ = both
    problems = []
    for (route, body, _), (status, _, content_type, text) in zip(requests(), direct, strict=True):
        where = f"{route} {(body or b'')[:60]!r}: {status} {text[:120]}"
        if (status >= 500 and not (status == 502 and "could not be parsed" in text)) or "Traceback" in text:
            # (DummyLM has no answer for an unknown question: the LM's fault, a 502, is the right answer.)
            problems.append(f"a server error or a traceback: {where}")
        elif content_type.startswith("text/event-stream"):
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            if not events or not all(e == "[DONE]" or isinstance(json.loads(e), dict) for e in events):
                problems.append(f"a stream whose events are not JSON: {where}")
        elif content_type.startswith("application/json"):
            answer = json.loads(text)
            if status >= 400:
                error = answer.get("error") if isinstance(answer, dict) else None
                openai_error = isinstance(error, dict) and error.get("message") and error.get("type")
                # /invocations answers a program's failure in MLflow's scoring server's shape.
                mlflow_error = route == "/invocations" and answer.get("message") and answer.get("error_code")
                if not (openai_error or mlflow_error):
                    problems.append(f"an error that is neither OpenAI's nor (/invocations) MLflow's: {where}")
        else:
            problems.append(f"neither JSON nor a stream ({content_type}): {where}")
    assert not problems, "\n".join(problems[:10])
