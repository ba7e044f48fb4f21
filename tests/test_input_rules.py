"""One rule for every protocol (chat completions, Responses, /predict and /predict/stream, /invocations), in
process on a DummyLM: a question that is empty or only white space is a 400 naming where it is, before the
program runs (the DummyLM would answer any question); a UTF-8 byte order mark before a JSON body is
ignored, one anywhere else is invalid JSON; and `GET /v1/models/` (no id) is a 404, not the default
model's card."""

from __future__ import annotations

import dspy
import httpx
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost

QUESTION = "What is 2 + 2?"
BOM = b"\xef\xbb\xbf"


@pytest.fixture
async def served():
    lm = DummyLM({QUESTION: {"reasoning": "two and two", "answer": "4"}})
    host = ProgramHost(ChatProgram(dspy.ChainOfThought("question -> answer")), lm, dspy.ChatAdapter(), "qa", "qa")
    app = create_app(GatewayConfig(), host=host)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        yield client


def chat(text: str, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": text}], "stream": stream}


# Every protocol's body for a question, and where its error names the question.
ASKED = {
    "chat": ("/v1/chat/completions", chat, "messages"),
    "chat, streamed": ("/v1/chat/completions", lambda q: chat(q, stream=True), "messages"),
    "responses": ("/v1/responses", lambda q: {"input": q}, "input"),
    "responses, a message": ("/v1/responses", lambda q: {"input": [{"role": "user", "content": q}]}, "input"),
    "responses, streamed": ("/v1/responses", lambda q: {"input": q, "stream": True}, "input"),
    "predict": ("/predict", lambda q: {"question": q}, "question"),
    "predict, the tutorial's text": ("/predict", lambda q: {"text": q}, "text"),
    "predict/stream": ("/predict/stream", lambda q: {"question": q}, "question"),
    "invocations": ("/invocations", chat, "messages"),
}


@pytest.mark.parametrize("protocol", list(ASKED))
@pytest.mark.parametrize("question", ["", "  \n\t"])
async def test_an_empty_or_blank_question_is_a_400_on_every_protocol_before_any_lm_call(served, protocol, question):
    client = served
    path, body, param = ASKED[protocol]
    reply = await client.post(path, json=body(question))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "is empty: there is no question to answer" in error["message"], error


@pytest.mark.parametrize("protocol", list(ASKED))
async def test_a_byte_order_mark_before_the_body_is_ignored_on_every_protocol(served, protocol):
    client = served
    path, body, _ = ASKED[protocol]
    sent = httpx.Request("POST", "http://gateway", json=body(QUESTION)).content
    reply = await client.post(path, content=BOM + sent, headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert "4" in reply.text, reply.text
    inside = sent[:1] + BOM + sent[1:]  # not at the start: not JSON
    refused = await client.post(path, content=inside, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "not valid JSON" in refused.json()["error"]["message"], refused.text


async def test_models_with_a_trailing_slash_and_no_id_is_404(served):
    client = served
    empty = await client.get("/v1/models/")
    assert empty.status_code == 404 and empty.json()["error"]["type"] == "not_found_error", empty.text
    assert (await client.get("/v1/models/qa")).json()["id"] == "qa"
    assert [card["id"] for card in (await client.get("/v1/models")).json()["data"]] == ["qa"]
