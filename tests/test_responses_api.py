"""POST /v1/responses, the OpenAI Responses API: in process (httpx over ASGI, DummyLM as in
test_gateway_app.py, and the official openai SDK on that transport), and against a real gateway
process with the stub LM."""

from __future__ import annotations

import json

import dspy
import httpx
import openai
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.examples import example_chat

ANSWERS = {  # DummyLM answers the first key its last message contains
    "Capital of Peru?": {"reasoning": "geography", "answer": "Lima"},
    "What is 2 + 2?": {"reasoning": "two and two", "answer": "4"},
}
TEXT_STREAM_ORDER = [
    "response.created", "response.in_progress",
    "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
    "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
    "response.output_item.added", "response.content_part.added", "response.output_text.delta",
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.completed",
]


class RecordingLM(DummyLM):
    """Keeps the messages and settings of every call."""

    calls: list[dict] = []

    async def acall(self, prompt=None, messages=None, **kwargs):
        RecordingLM.calls.append({"messages": messages, "settings": dict(self.kwargs)})
        return await super().acall(prompt=prompt, messages=messages, **kwargs)


def make_app(lm: dspy.BaseLM | None = None, program: str = "qa", **config):
    host = ProgramHost(example_chat(program), lm or DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")
    return create_app(GatewayConfig(**config), host=host)


@pytest.fixture
async def client():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://gateway") as c:
        yield c


@pytest.fixture
async def sdk():
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://gateway")
    async with openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http) as c:
        yield c


def events_of(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next(line[7:] for line in lines if line.startswith("event: "))
        data = json.loads("".join(line[6:] for line in lines if line.startswith("data: ")))
        events.append((name, data))
    return events


async def test_a_response_has_the_openai_shape(client):
    response = await client.post("/v1/responses", json={"model": "qa", "input": "What is 2 + 2?"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert isinstance(body["created_at"], int)
    assert (body["status"], body["model"], body["error"], body["incomplete_details"]) == ("completed", "qa", None, None)
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "two and two"}]
    assert message["id"].startswith("msg_")
    assert {k: v for k, v in message.items() if k != "id"} == {
        "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "4", "annotations": [], "logprobs": []}]}
    usage = body["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert (body["tools"], body["parallel_tool_calls"], body["tool_choice"]) == ([], True, "auto")
    assert body["text"] == {"format": {"type": "text"}}


async def test_model_is_optional_and_an_unknown_one_is_a_404(client):
    assert (await client.post("/v1/responses", json={"input": "What is 2 + 2?"})).status_code == 200
    unknown = await client.post("/v1/responses", json={"model": "gpt-4o", "input": "What is 2 + 2?"})
    assert unknown.status_code == 404 and "not served here" in unknown.json()["error"]["message"]


async def test_the_official_sdk_parses_the_response(sdk):
    response = await sdk.responses.create(model="qa", input="What is 2 + 2?", metadata={"team": "a"},
                                          store=True, user="u-1", temperature=0.2)
    assert response.output_text == "4"
    assert response.status == "completed" and response.metadata == {"team": "a"}
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.output[0].type == "reasoning" and response.output[0].content[0].text == "two and two"


async def test_instructions_and_earlier_turns_reach_the_program():
    lm = RecordingLM({"Capital of Peru?": {"answer": "Lima"}})
    app = make_app(lm, program="assistant")  # a multi-turn program: earlier turns reach it as its history
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        response = await client.post("/v1/responses", json={
            "instructions": "Answer like a pirate.",
            "input": [
                {"role": "user", "content": "What is 2 + 2?"},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "four, matey", "annotations": []}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                                 "text": "ignored"}]},
                {"role": "developer", "content": "Be brief."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Capital of Peru?"}]},
            ],
            "max_output_tokens": 300, "temperature": 0.3, "top_p": 0.9,
        })
    assert response.status_code == 200, response.text
    assert response.json()["output"][-1]["content"][0]["text"] == "Lima"
    call = RecordingLM.calls[-1]
    prompt = "\n".join(str(m["content"]) for m in call["messages"])
    assert "Answer like a pirate." in prompt and "Be brief." in prompt
    assert "four, matey" in prompt and "Capital of Peru?" in prompt and "ignored" not in prompt
    assert call["settings"] == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 300}


async def test_the_output_of_a_response_can_be_sent_back_as_input(sdk):
    first = await sdk.responses.create(model="qa", input="What is 2 + 2?")
    follow_up = [{"role": "user", "content": "What is 2 + 2?"}, *[item.model_dump() for item in first.output],
                 {"role": "user", "content": "Capital of Peru?"}]
    second = await sdk.responses.create(model="qa", input=follow_up)
    assert second.output_text == "Lima"


async def test_max_output_tokens_reached_is_an_incomplete_response(client):
    unknown = "a question the LM cannot answer"  # DummyLM: an unparseable answer, as if cut short
    limited = await client.post("/v1/responses", json={"input": unknown, "max_output_tokens": 3})
    assert limited.status_code == 200, limited.text
    body = limited.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][-1]["status"] == "incomplete"
    unlimited = await client.post("/v1/responses", json={"input": unknown})
    assert unlimited.status_code == 502 and unlimited.json()["error"]["code"] == "lm_output_unparseable"


async def test_the_stream_sends_the_responses_events_in_order(client):
    response = await client.post("/v1/responses", json={"input": "What is 2 + 2?", "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response.text)
    names = [name for name, _ in events]
    assert names == TEXT_STREAM_ORDER  # the reasoning item first (DummyLM: one delta each), then the message
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    message_index = deltas[0]["output_index"]
    assert {d["item_id"] for d in deltas} == {events[-1][1]["response"]["output"][message_index]["id"]}
    assert all(d["content_index"] == 0 and d["logprobs"] == [] for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    done = next(data for name, data in events if name == "response.output_text.done")
    assert done["text"] == text == "4"
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed" and completed["output"][-1]["content"][0]["text"] == "4"
    assert completed["usage"]["total_tokens"] >= 0
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == completed["id"]


async def test_the_sdk_stream_helper_reads_the_stream(sdk):
    async with sdk.responses.stream(model="qa", input="What is 2 + 2?") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "4"


async def test_a_failure_mid_stream_is_an_error_then_response_failed(client):
    response = await client.post("/v1/responses", json={"input": "a question the LM cannot answer", "stream": True})
    assert response.status_code == 200
    events = events_of(response.text)
    (error_name, error), (failed_name, failed) = events[-2:]
    assert (error_name, failed_name) == ("error", "response.failed")
    assert error["code"] == "lm_output_unparseable" and error["message"]
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "server_error"


async def test_a_stream_cut_by_max_output_tokens_ends_incomplete(client):
    body = {"input": "a question the LM cannot answer", "stream": True, "max_output_tokens": 3}
    events = events_of((await client.post("/v1/responses", json=body)).text)
    name, last = events[-1]
    assert name == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "send the whole conversation"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "stateless"),
        ({"input": "hi", "bogus": 1}, "bogus", "unknown field 'bogus'"),
        ({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": "required"}, "tool_choice",
         "its own outputs"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice", "no tools are sent"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "out", "schema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}}, "text", "asks for city"),
        ({"input": "hi", "background": True}, "background", "stateless"),
        ({"input": "hi", "top_logprobs": 2}, "top_logprobs", "log-probabilities"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
        ({}, "input", "'input' is required"),
        ({"input": []}, "input", "non-empty list"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input", "input[0].role"),
        ({"input": [{"role": "user", "content": "x", "extra": 1}]}, "input", "unknown field 'input[0].extra'"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input", "never calls tools"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "stateless"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input",
         "input[0].content[0] is a 'input_image' part"),
        ({"input": [{"role": "system", "content": "x"}]}, "input", "no user message"),
        ({"instructions": "be kind", "input": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                  "content": "a"}]},
         "input", "input[1] is an assistant message"),
    ],
)
async def test_refusals_are_400s_that_name_the_problem(client, body, param, fragment):
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"], error["message"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"input": "\\ud800"}', "input is not valid Unicode"),
        ('{"input": "hi", "instructions": "\\ud800"}', "instructions is not valid Unicode"),
        ('{"input": [{"role": "user", "content": [{"type": "\\ud800", "text": "x"}]}]}',
         "input[0].content[0].type is not valid Unicode"),
        ('{"input": [{"role": "user", "content": "x", "\\ud800": 1}]}', "input[0].\\ud800 is not valid Unicode"),
        ('{"input": [{"type": "\\ud800"}]}', "input[0].type is not valid Unicode"),
        ('{"input": [5]}', "input[0] must be an object"),
        ('{"input": 5}', "'input' must be a string or a non-empty list"),
    ],
)
async def test_odd_inputs_are_400_not_500(client, body, fragment):
    response = await client.post("/v1/responses", content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


async def test_the_message_and_character_limits_apply():
    app = make_app(max_messages=2, max_characters=20)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        many = await client.post("/v1/responses", json={"instructions": "x", "input": [
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
        long = await client.post("/v1/responses", json={"input": "y" * 21})
    assert (many.status_code, many.json()["error"]["code"]) == (400, "too_many_messages")
    assert (long.status_code, long.json()["error"]["code"]) == (400, "too_many_characters")


async def test_the_openapi_document_describes_the_route(client):
    document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/responses"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert "input" in document["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"400", "404", "502"} <= set(operation["responses"])


def test_the_official_sdk_against_a_real_gateway(shared_gateway):
    # The shared gateway process, over TCP, on the stub LM.
    client = openai.OpenAI(base_url=f"{shared_gateway.url}/v1", api_key="unused")
    created = client.responses.create(model="dspy-qa", input="Say hello", instructions="Be brief.")
    assert created.status == "completed" and created.output_text
    with client.responses.stream(model="dspy-qa", input="Say hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and "".join(deltas) == final.output_text == created.output_text
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1 and completed[0].response.output_text == final.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="dspy-qa", input="Say hello", previous_response_id=created.id)
    assert "stateless" in refused.value.message


async def test_the_responses_route_takes_only_json_bodies_and_counts_against_the_cap():
    app = make_app(max_in_flight=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        plain = await c.post("/v1/responses", content=b"hello", headers={"Content-Type": "text/plain"})
        busy = await c.post("/v1/responses", json={"input": "What is 2 + 2?"})
    assert plain.status_code == 415
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
