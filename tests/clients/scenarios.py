"""Real clients calling a gateway, one scenario per call, run in a client virtualenv (agents.txt or
instructor.txt): `python scenarios.py SCENARIO QA_BASE_URL TRIAGE_BASE_URL` prints one JSON line, what the
client got back. The gateways serve `qa-model` (a question answered in text) and `triage-model` (category
and priority): tests/support/client_programs.py."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Literal

from pydantic import BaseModel

QA, TRIAGE = "qa-model", "triage-model"
TICKET = "I was charged twice for my plan this month."


class TriageResult(BaseModel):
    category: Literal["billing", "technical", "other"]
    priority: int


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def openai_agents(qa: str, triage: str, kind: str) -> dict:
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # it would export traces to OpenAI
    model_of = {"chat": OpenAIChatCompletionsModel, "responses": OpenAIResponsesModel}[kind.split("-")[0]]
    if kind.endswith("tool"):
        client = AsyncOpenAI(base_url=f"{qa}/v1", api_key="unused")
        agent = Agent(name="a", instructions="Answer.", model=model_of(QA, client), tools=[function_tool(get_weather)])
        return {"output": Runner.run_sync(agent, "Say hello").final_output}
    client = AsyncOpenAI(base_url=f"{triage}/v1", api_key="unused")
    agent = Agent(name="a", instructions="Route it.", model=model_of(TRIAGE, client), output_type=TriageResult)
    return {"output": Runner.run_sync(agent, TICKET).final_output.model_dump()}


def pydantic_ai(qa: str, triage: str, kind: str) -> dict:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    if kind == "tool":
        agent = Agent(OpenAIChatModel(QA, provider=OpenAIProvider(base_url=f"{qa}/v1", api_key="unused")))

        @agent.tool_plain
        def weather(city: str) -> str:
            """The weather in a city."""
            return get_weather(city)

        return {"output": agent.run_sync("Say hello").output}
    model = OpenAIChatModel(TRIAGE, provider=OpenAIProvider(base_url=f"{triage}/v1", api_key="unused"))
    return {"output": Agent(model, output_type=TriageResult).run_sync(TICKET).output.model_dump()}


def langchain(qa: str, triage: str, kind: str) -> dict:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    if kind == "bind_tools":
        chat = ChatOpenAI(model=QA, base_url=f"{qa}/v1", api_key="unused").bind_tools([tool(get_weather)])
        message = chat.invoke("Say hello")
        return {"output": message.content, "tool_calls": message.tool_calls}
    chat = ChatOpenAI(model=TRIAGE, base_url=f"{triage}/v1", api_key="unused")
    structured = chat.with_structured_output(TriageResult, method=kind)
    return {"output": structured.invoke(TICKET).model_dump()}


def instructor_(qa: str, triage: str, kind: str) -> dict:
    import instructor
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=f"{triage}/v1", api_key="unused"),
                                    mode={"tools": instructor.Mode.TOOLS, "json": instructor.Mode.JSON}[kind])
    result = client.chat.completions.create(model=TRIAGE, response_model=TriageResult, max_retries=0,
                                            messages=[{"role": "user", "content": TICKET}])
    return {"output": result.model_dump()}


def responses_parse(qa: str, triage: str, kind: str) -> dict:
    from openai import OpenAI

    parsed = OpenAI(base_url=f"{triage}/v1", api_key="unused").responses.parse(model=TRIAGE, input=TICKET,
                                                                                text_format=TriageResult)
    return {"output": parsed.output_parsed.model_dump()}


SCENARIOS = {
    "openai-agents/chat-tool": (openai_agents, "chat-tool"),
    "openai-agents/responses-tool": (openai_agents, "responses-tool"),
    "openai-agents/chat-output": (openai_agents, "chat-output"),
    "openai-agents/responses-output": (openai_agents, "responses-output"),
    "pydantic-ai/tool": (pydantic_ai, "tool"),
    "pydantic-ai/output": (pydantic_ai, "output"),
    "langchain/bind_tools": (langchain, "bind_tools"),
    "langchain/function_calling": (langchain, "function_calling"),
    "langchain/json_schema": (langchain, "json_schema"),
    "instructor/tools": (instructor_, "tools"),
    "instructor/json": (instructor_, "json"),
    "openai/responses.parse": (responses_parse, ""),
}

if __name__ == "__main__":
    name, qa_base, triage_base = sys.argv[1:4]
    function, kind = SCENARIOS[name]
    try:
        result = function(qa_base, triage_base, kind)
    except Exception as exc:  # what the client raised, for the test to show
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(result, default=str))
    asyncio.set_event_loop(None)
