"""The OpenAI Responses API (`POST /v1/responses`) over the chat program: a parsed request and the program
in, a Response or its event stream out. `instructions` and `input` become the one `Conversation` the
program is handed, under the chat route's limits; the request's run (runtime/run.py) is encoded as a
Response, or as the events of events.ResponseEvents."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.chat.service import ConversationLimits, json_content
from mlflow_dspy.gateway.chat.structured import USUAL, AnswerShape
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.dspy_client import adapter_prompt
from mlflow_dspy.gateway.errors import GatewayError, invalid_request
from mlflow_dspy.gateway.responses.events import ResponseEvents
from mlflow_dspy.gateway.responses.wire import (
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    Status,
    step_items,
)
from mlflow_dspy.program.chat import ChatInputError, Conversation, Message
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Delta, Failed, Finished, Run, ToolStep, Usage, tool_steps


class ResponsesService:
    def __init__(self, limits: ConversationLimits) -> None:
        self.limits = limits  # chat completions' own

    def conversation(self, messages: list[Message]) -> Conversation:
        """The conversation, checked like a chat request's; errors name `input`'s items."""
        self.limits.check_count(len(messages), param="input")
        try:
            conversation = Conversation.of(messages, collection="the input")
        except ChatInputError as exc:
            raise invalid_request(exc.message, param="input", code="invalid_messages") from None
        self.limits.check_characters(conversation.characters, param="input")
        return conversation

    async def create(self, ctx: RequestContext, host: ProgramHost, body: ResponsesRequest) -> Response:
        messages = body.messages()
        conversation = self.conversation(messages)
        # A DSPy program calling with its adapter's prompt (`dspy.LM(..., model_type="responses")`) gets its
        # fields answered in its adapter's format, as on chat completions.
        prompt = adapter_prompt(messages)
        if prompt is not None:
            prompt.check(host.program)
            conversation, shape = prompt.conversation(host.program), USUAL
        else:
            shape = body.answer_shape(host.program)
        response = ResponseObject.for_request(body, host.name)
        run = ctx.start_run(host, conversation, stream=body.stream and prompt is None, lm_settings=body.lm_settings())
        # The tools the program ran are shown as their calls and outputs, unless the client sent tools of its
        # own: an agent framework would take a call as one of its own to run.
        show_steps = not body.tools
        if run.stream:
            return EventSourceResponse(_events(run, response, host, shape, show_steps), sep="\n", ping=15)
        outcome = await run.outcome()
        if isinstance(outcome, Failed):
            raise GatewayError.of(outcome.failure)
        prediction, reasoning = outcome.prediction, host.reasoning(outcome.prediction)
        incomplete = outcome.finish_reason == "length"
        if prompt is not None:
            content = prompt.reply(prompt.values(host.program, prediction, host.content(prediction), reasoning))
            reasoning = None
        else:
            content = json_content(host, prediction, shape)
        if body.stream:  # a DSPy client streaming: its adapter parses the whole answer, sent as one delta
            return EventSourceResponse(_whole(response, content, outcome.usage, incomplete), sep="\n", ping=15)
        steps = tool_steps(prediction) if show_steps else []
        response.finish(_output(reasoning, steps, content, shape, incomplete), outcome.usage, incomplete)
        return Response(response.model_dump_json(), media_type="application/json")


def _output(reasoning: str | None, steps: list[ToolStep], content: str, shape: AnswerShape,
            incomplete: bool) -> list[OutputItem]:
    status: Status = "incomplete" if incomplete else "completed"
    items: list[OutputItem] = []
    if reasoning:
        items.append(ReasoningItem(content=[ReasoningText(text=reasoning)]))
    for step in steps:
        items.extend(step_items(step))
    if shape.tool is not None:
        items.append(FunctionCallItem(name=shape.tool, arguments=content, status=status))
    else:
        items.append(OutputMessage(status=status, content=[OutputText(text=content)]))
    return items


async def _whole(response: ResponseObject, content: str, usage: Usage, incomplete: bool) -> AsyncIterator[dict]:
    """A finished answer as the events of a stream: created, in progress, its text as one delta, completed."""
    events = ResponseEvents(response)
    yield events.send("response.created", response=response.model_dump())
    yield events.send("response.in_progress", response=response.model_dump())
    for sent in events.delta("content", content):
        yield sent
    for sent in events.finish(usage, incomplete):
        yield sent


async def _events(run: Run, response: ResponseObject, host: ProgramHost, shape: AnswerShape,
                  show_steps: bool) -> AsyncIterator[dict]:
    """A run's events as the Responses stream: created, in progress, the items as their text comes, then
    completed (or incomplete, cut short by max_output_tokens), or an error and failed. An answer asked for as
    JSON (text.format) is whole at the end; a forced function's call is one function_call item."""
    events = ResponseEvents(response)
    yield events.send("response.created", response=response.model_dump())
    yield events.send("response.in_progress", response=response.model_dump())
    async for event in run.events():
        if isinstance(event, Delta):
            if event.field != "content" or shape.fields is None:
                for sent in events.delta(event.field, event.text):
                    yield sent
        elif isinstance(event, ToolStep):
            if show_steps:
                for sent in events.step(event):
                    yield sent
        elif isinstance(event, Failed):
            # The status line is already sent: the failure travels as events.
            for sent in events.failed(GatewayError.of(event.failure)):
                yield sent
            return
        elif isinstance(event, Finished):
            if shape.tool is not None:
                for sent in events.call(shape.tool, json_content(host, event.prediction, shape)):
                    yield sent
            elif shape.fields is not None:
                for sent in events.delta("content", json_content(host, event.prediction, shape)):
                    yield sent
            for sent in events.finish(event.usage, event.finish_reason == "length"):
                yield sent
