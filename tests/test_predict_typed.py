"""The typed /predict in process (httpx over ASGI, DummyLM in dict mode): the
program's own input fields by name, validated against its signature's types;
typed outputs; errors naming the field; the tutorial's {"text": ...}; and an
/openapi.json that documents the served program's fields once it is loaded."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import dspy
import httpx
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost


class Triage(dspy.Signature):
    """Route a support ticket."""

    ticket: str = dspy.InputField(desc="the customer's message")
    priority: int = dspy.InputField(desc="1 (urgent) to 5")
    category: Literal["billing", "bug", "other"] = dspy.OutputField()
    minutes: int = dspy.OutputField(desc="estimated handling time")


class Chat(dspy.Signature):
    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


TICKET = "I was charged twice"
TRIAGE_ANSWERS = {TICKET: {"category": "billing", "minutes": 15}}
QA_ANSWERS = {"What is 2 + 2?": {"reasoning": "two and two", "answer": "4"}}


def client_for(program: dspy.Module, answers: dict, **config) -> httpx.AsyncClient:
    host = ProgramHost(ChatProgram(program), DummyLM(answers), dspy.ChatAdapter(), "test", "test")
    app = create_app(GatewayConfig(**config), host=host)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def triage():
    async with client_for(dspy.Predict(Triage), TRIAGE_ANSWERS) as client:
        yield client


@pytest.fixture
async def qa():
    async with client_for(dspy.ChainOfThought("question -> answer"), QA_ANSWERS) as client:
        yield client


def error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_typed_inputs_give_typed_outputs(triage):
    response = await triage.post("/predict", json={"ticket": TICKET, "priority": 2})
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "success", "data": {"category": "billing", "minutes": 15}}
    assert isinstance(response.json()["data"]["minutes"], int)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"ticket": TICKET, "priority": "high"}, "priority", "'priority'"),
        ({"ticket": TICKET, "priority": "2"}, "priority", "'priority'"),  # no coercion, as on the chat routes
        ({"ticket": TICKET, "priority": 2.5}, "priority", "'priority'"),
        ({"ticket": 7, "priority": 2}, "ticket", "'ticket'"),
        ({"ticket": TICKET}, "priority", "'priority' is required"),
        ({"priority": 2}, "ticket", "'ticket' is required"),
        ({"ticket": TICKET, "priority": 2, "urgency": "high"}, "urgency", "unknown field 'urgency'"),
        ({"text": TICKET}, "ticket", "'ticket' is required"),  # two inputs: no {"text": ...} form
    ],
)
async def test_invalid_inputs_are_400_naming_the_field(triage, body, param, fragment):
    problem = error(await triage.post("/predict", json=body))
    assert problem["param"] == param
    assert fragment in problem["message"]
    assert problem["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[1, 2]", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b'{"ticket": "\\ud800", "priority": 2}', "ticket"),
        (b'{"ticket": "x", "priority": NaN}', "priority"),
    ],
)
async def test_odd_bodies_are_400(triage, raw, fragment):
    response = await triage.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert fragment in error(response)["message"]


async def test_the_character_limit_counts_every_string_input():
    async with client_for(dspy.Predict(Triage), TRIAGE_ANSWERS, max_characters=10) as client:
        problem = error(await client.post("/predict", json={"ticket": "x" * 11, "priority": 2}))
    assert problem["code"] == "too_many_characters"


async def test_the_tutorial_text_body_fills_the_one_input(qa):
    response = await qa.post("/predict", json={"text": "What is 2 + 2?"})
    assert response.json() == {"status": "success", "data": {"reasoning": "two and two", "answer": "4"}}
    typed = await qa.post("/predict", json={"question": "What is 2 + 2?"})
    assert typed.json() == response.json()
    assert error(await qa.post("/predict", json={"text": "What is 2 + 2?", "extra": 1}))["param"] == "extra"
    assert error(await qa.post("/predict", json={"text": ""}))["param"] == "text"


async def test_an_input_named_text_is_the_typed_form():
    async with client_for(dspy.Predict("text -> summary"), {"long story": {"summary": "short"}}) as client:
        response = await client.post("/predict", json={"text": "long story"})
        assert response.json() == {"status": "success", "data": {"summary": "short"}}
        assert error(await client.post("/predict", json={"text": 3}))["param"] == "text"


async def test_a_history_input_takes_dspy_history_or_chat_turns():
    answers = {"And 3 + 3?": {"answer": "6"}}
    async with client_for(dspy.Predict(Chat), answers) as client:
        for history in (
            {"messages": [{"question": "What is 2 + 2?", "answer": "4"}]},
            [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
            None,  # optional, as in a chat
        ):
            body = {"question": "And 3 + 3?"} | ({"history": history} if history is not None else {})
            response = await client.post("/predict", json=body)
            assert response.json() == {"status": "success", "data": {"answer": "6"}}, history
        bad = error(await client.post("/predict", json={"question": "And 3 + 3?",
                                                          "history": [{"role": "wizard", "content": "x"}]}))
        assert bad["param"] == "history"
        assert error(await client.post("/predict", json={"question": "x", "history": 5}))["param"] == "history"


async def test_the_stream_takes_the_same_body(triage):
    body = {"ticket": TICKET, "priority": 2}
    async with triage.stream("POST", "/predict/stream", json=body) as stream:
        assert stream.status_code == 200
        lines = [line[6:] async for line in stream.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    assert events[-1] == {"prediction": {"category": "billing", "minutes": 15}}
    refused = await triage.post("/predict/stream", json={"ticket": TICKET, "priority": "high"})
    assert error(refused)["param"] == "priority"


async def test_openapi_documents_the_programs_fields(triage):
    schema = (await triage.get("/openapi.json")).json()
    components = schema["components"]["schemas"]

    def resolve(node: dict) -> dict:
        return components[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    for route in ("/predict", "/predict/stream"):
        body = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        inputs = resolve(body)
        assert inputs["properties"]["ticket"]["type"] == "string"
        assert inputs["properties"]["ticket"]["description"] == "the customer's message"
        assert inputs["properties"]["priority"]["type"] == "integer"
        assert set(inputs["required"]) == {"ticket", "priority"}
        assert inputs["additionalProperties"] is False
    ok = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    result = resolve(ok)
    outputs = resolve(result["properties"]["data"])
    assert outputs["properties"]["category"]["enum"] == ["billing", "bug", "other"]
    assert outputs["properties"]["minutes"]["type"] == "integer"
    # The chat routes are still documented as before.
    assert "ChatCompletionRequest" in components


async def test_openapi_offers_the_text_form_for_a_one_input_program(qa):
    schema = (await qa.get("/openapi.json")).json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    forms = [schema["components"]["schemas"][b["$ref"].rsplit("/", 1)[1]] for b in body["anyOf"]]
    assert [sorted(f["properties"]) for f in forms] == [["question"], ["text"]]
    ok = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    result = schema["components"]["schemas"][ok["$ref"].rsplit("/", 1)[1]]
    outputs = schema["components"]["schemas"][result["properties"]["data"]["$ref"].rsplit("/", 1)[1]]
    assert set(outputs["properties"]) == {"reasoning", "answer"}


async def test_openapi_made_before_the_load_is_not_kept():
    """The program loads in the background: /openapi.json documents it once it is there."""
    from mlflow_dspy.gateway import openapi

    host = ProgramHost(ChatProgram(dspy.Predict(Triage)), DummyLM(TRIAGE_ANSWERS), dspy.ChatAdapter(), "t", "t")
    asgi = create_app(GatewayConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://gateway") as client:
        before = (await client.get("/openapi.json")).json()
        body = before["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["type"] == "object"  # any object, until the program is known
        assert (await client.post("/predict", json={"ticket": TICKET, "priority": 2})).status_code == 503
        asgi.models.router.add_host(host)  # what the loader thread does
        asgi.models.loaded = True
        after = (await client.get("/openapi.json")).json()
        assert after["components"]["schemas"]["PredictInputs"]["properties"]["priority"]["type"] == "integer"
        assert (await client.post("/predict", json={"ticket": TICKET, "priority": 2})).status_code == 200
    assert openapi.PREDICT_ROUTES == ("/predict", "/predict/stream")


async def test_the_inputs_model_is_built_once_per_host(triage, monkeypatch):
    from mlflow_dspy.gateway.predict import service as predict_service

    built = []
    real = predict_service.PredictShape

    def counting(program):
        built.append(program)
        return real(program)

    monkeypatch.setattr(predict_service, "PredictShape", counting)
    bodies = [{"ticket": TICKET, "priority": p} for p in (1, 2, 3)]
    responses = await asyncio.gather(*(triage.post("/predict", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200, 200, 200]
    await triage.get("/openapi.json")
    assert len(built) == 1
