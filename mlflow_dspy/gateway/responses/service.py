"""The OpenAI Responses API (`POST /v1/responses`) over the chat program: a parsed request and the program
in, a Response or its event stream out. `instructions` and `input` become the one `Conversation` the
program is handed, under the chat route's limits; the request's run (runtime/run.py) is encoded as a
Response, or as the events of events.ResponseEvents."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.chat.service import ConversationLimits
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.errors import GatewayError, invalid_request
from mlflow_dspy.gateway.responses.events import ResponseEvents
from mlflow_dspy.gateway.responses.wire import (
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    Status,
)
from mlflow_dspy.program.chat import ChatInputError, Conversation
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Delta, Failed, Finished, Run


class ResponsesService:
    def __init__(self, limits: ConversationLimits) -> None:
        self.limits = limits  # chat completions' own

    def conversation(self, body: ResponsesRequest) -> Conversation:
        """The conversation, checked like a chat request's; errors name `input`'s items."""
        messages = body.messages()
        self.limits.check_count(len(messages), param="input")
        try:
            conversation = Conversation.of(messages, collection="the input")
        except ChatInputError as exc:
            raise invalid_request(exc.message, param="input", code="invalid_messages") from None
        self.limits.check_characters(conversation.characters, param="input")
        return conversation

    async def create(self, ctx: RequestContext, host: ProgramHost, body: ResponsesRequest) -> Response:
        conversation = self.conversation(body)
        response = ResponseObject.for_request(body, host.name)
        run = ctx.start_run(host, conversation, stream=body.stream, lm_settings=body.lm_settings())
        if run.stream:
            return EventSourceResponse(_events(run, response), sep="\n", ping=15)
        outcome = await run.outcome()
        if isinstance(outcome, Failed):
            raise GatewayError.of(outcome.failure)
        incomplete = outcome.finish_reason == "length"
        output = _output(host.reasoning(outcome.prediction), host.content(outcome.prediction), incomplete)
        response.finish(output, outcome.usage, incomplete)
        return Response(response.model_dump_json(), media_type="application/json")


def _output(reasoning: str | None, content: str, incomplete: bool) -> list[OutputMessage | ReasoningItem]:
    status: Status = "incomplete" if incomplete else "completed"
    items: list[OutputMessage | ReasoningItem] = []
    if reasoning:
        items.append(ReasoningItem(content=[ReasoningText(text=reasoning)]))
    items.append(OutputMessage(status=status, content=[OutputText(text=content)]))
    return items


async def _events(run: Run, response: ResponseObject) -> AsyncIterator[dict]:
    """A run's events as the Responses stream: created, in progress, the items as their text comes, then
    completed (or incomplete, cut short by max_output_tokens), or an error and failed."""
    events = ResponseEvents(response)
    yield events.send("response.created", response=response.model_dump())
    yield events.send("response.in_progress", response=response.model_dump())
    async for event in run.events():
        if isinstance(event, Delta):
            for sent in events.delta(event.field, event.text):
                yield sent
        elif isinstance(event, Failed):
            # The status line is already sent: the failure travels as events.
            for sent in events.failed(GatewayError.of(event.failure)):
                yield sent
            return
        elif isinstance(event, Finished):
            for sent in events.finish(event.usage, event.finish_reason == "length"):
                yield sent
