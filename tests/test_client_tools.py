"""Tools and structured output as agent frameworks send them, in process (DummyLM, the official openai SDK
over ASGI): tools with tool_choice absent or "auto" are answered in text; a forced function whose parameters
are the program's outputs is answered as a call of it (chat: tool_calls; Responses: a function_call item),
streamed or not; a forced tool the program cannot produce is refused saying why; json_object is honoured for
every program; the Responses API takes text.format and tools under chat's rules."""

from __future__ import annotations

import json
from typing import Literal

import dspy
import httpx
import openai
import pytest
from dspy.utils.dummies import DummyLM
from pydantic import BaseModel

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost

QUESTION = "What is 2 + 2?"
TICKET = "I was charged twice for my plan."


class Triage(dspy.Signature):
    """Route the ticket."""

    ticket: str = dspy.InputField()
    category: Literal["billing", "technical", "other"] = dspy.OutputField()
    priority: int = dspy.OutputField()


class TriageResult(BaseModel):  # what a client's structured output asks for: the program's outputs
    category: str
    priority: int


def tool(name: str, parameters: dict, flat: bool = False) -> dict:
    function = {"name": name, "description": f"the {name} tool", "parameters": parameters}
    return {"type": "function", **function} if flat else {"type": "function", "function": function}


WEATHER = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TRIAGE_TOOL = tool("TriageResult", TriageResult.model_json_schema())


def app_for(program: dspy.Module, answers: dict):
    host = ProgramHost(ChatProgram(program), DummyLM(answers), dspy.ChatAdapter(), "model", "test")
    return create_app(GatewayConfig(), host=host)


@pytest.fixture
def qa():
    return app_for(dspy.ChainOfThought("question -> answer"), {QUESTION: {"reasoning": "two and two", "answer": "4"}})


@pytest.fixture
def triage():
    return app_for(dspy.Predict(Triage), {TICKET: {"category": "billing", "priority": 2}})


def sdk(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g")
    return openai.AsyncOpenAI(base_url="http://g/v1", api_key="unused", http_client=http)


async def test_tools_the_program_does_not_call_are_answered_in_text(qa):
    client = sdk(qa)
    for choice in (openai.NOT_GIVEN, "auto", "none"):
        reply = await client.chat.completions.create(model="model", tools=[WEATHER], tool_choice=choice,
                                                     messages=[{"role": "user", "content": QUESTION}])
        message = reply.choices[0].message
        assert (message.content, message.tool_calls, reply.choices[0].finish_reason) == ("4", None, "stop")


async def test_a_forced_function_whose_parameters_are_the_outputs_is_answered_as_its_call(triage):
    client = sdk(triage)
    for choice in ({"type": "function", "function": {"name": "TriageResult"}}, "required"):
        reply = await client.chat.completions.create(model="model", tools=[WEATHER, TRIAGE_TOOL],
                                                     tool_choice=choice,
                                                     messages=[{"role": "user", "content": TICKET}])
        [call] = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert call.function.name == "TriageResult" and call.id.startswith("call_")
        assert TriageResult.model_validate_json(call.function.arguments) == TriageResult(category="billing",
                                                                                          priority=2)


async def test_a_forced_call_streams_as_one_tool_call_delta(triage):
    client = sdk(triage)
    stream = await client.chat.completions.create(
        model="model", stream=True, tools=[TRIAGE_TOOL], messages=[{"role": "user", "content": TICKET}],
        tool_choice={"type": "function", "function": {"name": "TriageResult"}})
    chunks = [chunk async for chunk in stream]
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "TriageResult"
    assert json.loads(calls[0][0].function.arguments) == {"category": "billing", "priority": 2}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


@pytest.mark.parametrize(("tools", "choice", "fragment"), [
    ([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, "city"),
    ([WEATHER], "required", "its own outputs"),
    ([TRIAGE_TOOL], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among"),
    ([], "required", "no tools are sent"),
])
async def test_a_forced_tool_the_program_cannot_produce_is_refused_saying_why(triage, tools, choice, fragment):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=triage), base_url="http://g") as client:
        refused = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": TICKET}], "tools": tools, "tool_choice": choice})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "tool_choice" and fragment in error["message"], error


async def test_json_object_is_honoured_for_a_one_field_program(qa):
    reply = await sdk(qa).chat.completions.create(model="model", response_format={"type": "json_object"},
                                                  messages=[{"role": "user", "content": QUESTION}])
    assert json.loads(reply.choices[0].message.content) == {"answer": "4"}


async def test_the_responses_api_takes_text_format_json_schema_and_parse_works(triage):
    parsed = await sdk(triage).responses.parse(model="model", input=TICKET, text_format=TriageResult)
    assert parsed.output_parsed == TriageResult(category="billing", priority=2)


async def test_the_responses_api_takes_json_object_and_tools(qa):
    client = sdk(qa)
    answer = await client.responses.create(model="model", input=QUESTION, text={"format": {"type": "json_object"}})
    assert json.loads(answer.output_text) == {"answer": "4"}
    flat_weather = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}, flat=True)
    answer = await client.responses.create(model="model", input=QUESTION, tools=[flat_weather], tool_choice="auto")
    assert answer.output_text == "4"


async def test_a_forced_function_on_the_responses_api_is_a_function_call_item(triage):
    flat = tool("TriageResult", TriageResult.model_json_schema(), flat=True)
    client = sdk(triage)
    answer = await client.responses.create(model="model", input=TICKET, tools=[flat],
                                           tool_choice={"type": "function", "name": "TriageResult"})
    [call] = [item for item in answer.output if item.type == "function_call"]
    assert call.name == "TriageResult" and json.loads(call.arguments) == {"category": "billing", "priority": 2}
    async with client.responses.stream(model="model", input=TICKET, tools=[flat],
                                       tool_choice={"type": "function", "name": "TriageResult"}) as stream:
        events = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.done" in events
    assert [item.type for item in final.output] == ["function_call"]


async def test_a_dspy_program_calls_the_gateway_through_the_responses_api(qa):
    """`dspy.LM(..., model_type="responses")`: DSPy's adapter prompt recognised there as on chat."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=qa), base_url="http://g")
    async with http:
        response = await http.post("/v1/responses", json={
            "model": "model",
            "input": [{"role": "system", "content": [{"type": "input_text", "text": _adapter_system()}]},
                      {"role": "user", "content": [{"type": "input_text", "text": "[[ ## question ## ]]\n"
                                                    f"{QUESTION}\n\nRespond with the corresponding output fields, "
                                                    "starting with the field `[[ ## answer ## ]]`, and then ending "
                                                    "with the marker for `[[ ## completed ## ]]`."}]}]})
    assert response.status_code == 200, response.text
    text = response.json()["output"][-1]["content"][0]["text"]
    assert "[[ ## answer ## ]]\n4" in text and "[[ ## completed ## ]]" in text


def _adapter_system() -> str:
    """The system message DSPy's ChatAdapter writes for `question -> answer`."""
    adapter, signature = dspy.ChatAdapter(), dspy.Signature("question -> answer")
    return adapter.format(signature, demos=[], inputs={"question": QUESTION})[0]["content"]


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return str(eval(expression, {"__builtins__": {}}))


def react_app():
    """A ReAct agent with one tool, scripted: the calculator once, then finish, then the answer."""
    steps = [{"next_thought": "compute it", "next_tool_name": "calculator", "next_tool_args": {"expression": "7*6"}},
             {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
             {"reasoning": "the calculator said 42", "answer": "42"}]
    program = dspy.ReAct("question -> answer", tools=[calculator], max_iters=3)
    host = ProgramHost(ChatProgram(program), DummyLM(steps * 3), dspy.ChatAdapter(), "agent", "test")
    return create_app(GatewayConfig(), host=host)


async def test_the_tools_an_agent_ran_are_function_call_items_of_its_response():
    client = sdk(react_app())
    answer = await client.responses.create(model="agent", input="What is 7 * 6?")
    call, output = [item for item in answer.output if item.type in ("function_call", "function_call_output")]
    assert (call.name, json.loads(call.arguments), output.call_id, output.output) == (
        "calculator", {"expression": "7*6"}, call.call_id, "42")
    assert answer.output_text == "42"


async def test_a_streamed_agent_tells_its_tool_steps_as_they_run():
    app = react_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        chat = await client.post("/v1/chat/completions", json={
            "stream": True, "messages": [{"role": "user", "content": "What is 7 * 6?"}]})
        predict = await client.post("/predict/stream", json={"question": "What is 7 * 6?"})
    comments = [line for line in chat.text.splitlines() if line.startswith(": tool ")]
    assert len(comments) == 1 and json.loads(comments[0][len(": tool "):]) == {
        "name": "calculator", "arguments": {"expression": "7*6"}, "output": "42"}
    events = [json.loads(line[6:]) for line in predict.text.splitlines() if line.startswith("data: {")]
    assert {"tool": {"name": "calculator", "arguments": {"expression": "7*6"}, "output": "42"}} in events
    stream_events = []
    async with sdk(app).responses.stream(model="agent", input="What is 7 * 6?") as stream:
        stream_events = [event async for event in stream]
        final = await stream.get_final_response()
    assert [item.type for item in final.output][:2] == ["function_call", "function_call_output"]
    assert any(e.type == "response.output_item.added" and e.item.type == "function_call" for e in stream_events)


async def test_an_agent_frameworks_own_tools_are_not_shown_calls_the_server_ran():
    answer = await sdk(react_app()).responses.create(model="agent", input="What is 7 * 6?", tools=[
        tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}, flat=True)])
    assert [item.type for item in answer.output if item.type.startswith("function")] == []
