"""Chat completions: a parsed request and the program it names in, a completion or its stream out.

As vLLM's `OpenAIServingChat`, this knows nothing of routes or HTTP: the gateway
parses the body (wire.ChatCompletionRequest) and picks the program; this reads the
messages into one `Conversation`, starts the request's run (runtime/run.py) and
encodes its events in OpenAI's shapes, streamed or collected.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import dspy
from fastapi.encoders import jsonable_encoder
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.chat.structured import USUAL, AnswerShape
from mlflow_dspy.gateway.chat.wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    ChunkDelta,
    FunctionCall,
    ToolCall,
    completion_id,
    conversation_of,
)
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.dspy_client import adapter_prompt
from mlflow_dspy.gateway.errors import GatewayError, invalid_request
from mlflow_dspy.program.chat import Conversation
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Delta, Failed, Finished, Run, ToolStep

# A chat delta's field for each text a run streams.
DELTA_FIELDS = {"content": "content", "reasoning": "reasoning_content"}


class ConversationLimits:
    """The most messages, and characters of text, a request may send (a 400 naming the one passed)."""

    def __init__(self, max_messages: int, max_characters: int) -> None:
        self.max_messages = max_messages
        self.max_characters = max_characters

    def check_count(self, count: int, param: str = "messages", holder: str | None = None) -> None:
        if count > self.max_messages:
            what = f"'{holder}' holds {count} messages" if holder else f"{count} messages"
            raise invalid_request(f"{what}; the limit is {self.max_messages}", param=param, code="too_many_messages")

    def check_characters(self, characters: int, what: str = "the messages", param: str | None = "messages") -> None:
        if characters > self.max_characters:
            raise invalid_request(f"{what} hold {characters} characters; the limit is {self.max_characters}",
                                  param=param, code="too_many_characters")

    def read(self, messages: list[ChatMessage]) -> Conversation:
        """The request's messages as a Conversation, within the limits."""
        self.check_count(len(messages))
        conversation = conversation_of(messages)
        self.check_characters(conversation.characters)
        return conversation


class ChatService:
    def __init__(self, limits: ConversationLimits) -> None:
        self.limits = limits

    async def create(self, ctx: RequestContext, host: ProgramHost, body: ChatCompletionRequest) -> Response:
        """The completion (or its event stream) for a parsed chat request, on the program it names."""
        conversation = self.limits.read(body.messages)
        # A DSPy program calling with its adapter's prompt gets its fields answered in its adapter's format.
        prompt = adapter_prompt(body.messages)
        if prompt is not None:
            prompt.check(host.program)
            conversation, shape = prompt.conversation(host.program), USUAL
        else:
            shape = body.answer_shape(host.program)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        run = ctx.start_run(host, conversation, stream=body.stream and prompt is None, lm_settings=body.lm_settings())
        if run.stream:
            return EventSourceResponse(_chunks(run, host, shape, include_usage), sep="\n", ping=15)
        outcome = await run.outcome()
        if isinstance(outcome, Failed):
            raise GatewayError.of(outcome.failure)
        prediction, reasoning = outcome.prediction, host.reasoning(outcome.prediction)
        if prompt is not None:
            # The reasoning travels in the adapter's own format (a `reasoning` field), if the client asks for it.
            message = AssistantMessage(content=prompt.reply(prompt.values(host.program, prediction,
                                                                          host.content(prediction), reasoning)))
        elif shape.tool is not None:
            message = AssistantMessage(content=None, reasoning_content=reasoning, tool_calls=[
                ToolCall(function=FunctionCall(name=shape.tool, arguments=json_content(host, prediction, shape)))])
        else:
            message = AssistantMessage(content=json_content(host, prediction, shape), reasoning_content=reasoning)
        completion = ChatCompletion(
            model=host.name, system_fingerprint=host.fingerprint, usage=outcome.usage,
            choices=[Choice(message=message, finish_reason=finish_reason(outcome, shape))])
        if body.stream:  # a DSPy client streaming: its adapter parses the whole answer, sent as one chunk
            return EventSourceResponse(_whole(completion, include_usage), sep="\n", ping=15)
        # Serialized by pydantic directly: FastAPI's generic encoder costs more than the rest of the reply.
        return Response(completion.model_dump_json(), media_type="application/json")


def json_content(host: ProgramHost, prediction: dspy.Prediction, shape: AnswerShape) -> str:
    """The chat answer; asked for as a JSON object (a response_format, a forced tool's arguments), the JSON
    object of the fields it asks for."""
    if shape.fields is None:
        return host.content(prediction)
    return json.dumps(jsonable_encoder({name: prediction.get(name) for name in shape.fields}))


def finish_reason(finished: Finished, shape: AnswerShape) -> str:
    """The run's finish_reason; "tool_calls" for a forced call the answer completed."""
    return "tool_calls" if shape.tool is not None and finished.finish_reason == "stop" else finished.finish_reason


def sse(data: Any) -> dict:
    """One server-sent event: a string as it is, anything else as JSON."""
    return {"data": data if isinstance(data, str) else json.dumps(data)}


def step_comment(step: ToolStep) -> dict:
    """A tool the program called, as a comment line of the stream (`: tool {...}`): shown to anyone reading
    the stream, skipped by SDKs, which read only its data (a chat chunk has no place for a server's tools)."""
    return {"comment": "tool " + json.dumps({"name": step.name, "arguments": step.arguments, "output": step.output},
                                            default=str)}


class _Chunks:
    """The chunks of one completion's stream: one id and creation time, only what each chunk carries."""

    def __init__(self, model: str, fingerprint: str | None, cid: str | None = None, created: int | None = None):
        self.head = {"id": cid or completion_id(), "created": created or int(time.time()), "model": model}
        self.fingerprint = fingerprint

    def delta(self, finish: str | None = None, **delta: Any) -> dict:
        chunk = ChatCompletionChunk(**self.head, system_fingerprint=self.fingerprint,
                                    choices=[ChunkChoice(delta=ChunkDelta(), finish_reason=finish)]).model_dump()
        chunk.pop("usage")
        chunk["choices"][0]["delta"] = delta
        return sse(chunk)

    def usage(self, usage: Any) -> dict:
        return sse(ChatCompletionChunk(**self.head, choices=[], usage=usage).model_dump())


async def _chunks(run: Run, host: ProgramHost, shape: AnswerShape, include_usage: bool) -> AsyncIterator[dict]:
    """A run's events as chat-completion chunks: the role, the text as it comes, the finish, the usage."""
    chunks = _Chunks(host.name, host.fingerprint)
    yield chunks.delta(role="assistant", content="")
    finished: Finished | None = None
    async for event in run.events():
        if isinstance(event, Delta):
            if event.field != "content" or shape.fields is None:  # a JSON answer is whole only at the end
                yield chunks.delta(**{DELTA_FIELDS[event.field]: event.text})
        elif isinstance(event, ToolStep):
            yield step_comment(event)
        elif isinstance(event, Failed):
            # The status line is already sent: the failure travels as an error event.
            yield sse(GatewayError.of(event.failure).body())
            yield sse("[DONE]")
            return
        else:
            finished = event
    if shape.tool is not None:
        call = ToolCall(function=FunctionCall(name=shape.tool, arguments=json_content(host, finished.prediction,
                                                                                      shape)))
        yield chunks.delta(tool_calls=[{"index": 0, **call.model_dump()}])
    elif shape.fields is not None:
        yield chunks.delta(content=json_content(host, finished.prediction, shape))
    yield chunks.delta(finish=finish_reason(finished, shape))
    if include_usage:
        yield chunks.usage(finished.usage)
    yield sse("[DONE]")


async def _whole(completion: ChatCompletion, include_usage: bool) -> AsyncIterator[dict]:
    """A finished completion as the chunks of a stream: the role, the content, the finish, the usage."""
    chunks = _Chunks(completion.model, None, completion.id, completion.created)
    choice = completion.choices[0]
    yield chunks.delta(role="assistant", content="")
    yield chunks.delta(content=choice.message.content)
    yield chunks.delta(finish=choice.finish_reason)
    if include_usage:
        yield chunks.usage(completion.usage)
    yield sse("[DONE]")
