"""The OpenAI Responses API (`POST /v1/responses`) over the chat program.

Two parts, kept apart as vLLM keeps its protocol from `OpenAIServingChat`:

- the wire models: `ResponsesRequest` (strict, like the chat request) and the
  Response object and stream events the official openai SDK parses;
- `ResponsesService`: a parsed request in, a Response or an event stream out.
  It turns `input` and `instructions` into chat messages and runs them the way
  the chat route does (the same program host, limits, truncation and error
  mapping, handed in by the app).

The server is stateless: nothing is stored, so `previous_response_id` (and
`conversation`, `prompt`, `background`) get a 400; the client sends the whole
conversation in `input`, as it does with chat completions.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import dspy
from pydantic import BaseModel, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.chat_service import ChatService
from mlflow_dspy.gateway.errors import GatewayError, from_program_failure, invalid_request
from mlflow_dspy.gateway.protocol import (
    MAX_COMPLETION_TOKENS,
    NO_TOOLS,
    OpenAIRequest,
    partial_outputs,
)
from mlflow_dspy.gateway.running import deadline, record_usage
from mlflow_dspy.lm_engine.deadline import within
from mlflow_dspy.program.chat import Conversation
from mlflow_dspy.runtime.host import Delta, ProgramHost, Usage

# -- the wire: requests -----------------------------------------------------------
STATELESS = "this server is stateless: it stores no responses, so send the whole conversation in `input`"
# Accepted and ignored: OpenAI takes them, and none can change what a DSPy program answers.
RESPONSES_IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id, for the provider's abuse monitoring",
    "safety_identifier": "the same, under its newer name",
    "metadata": "tags for OpenAI's stored responses (string values); echoed in the response",
    "store": "whether OpenAI keeps the response; this server keeps none (its traces are MLflow's)",
    "service_tier": "OpenAI's processing tier",
    "prompt_cache_key": "a hint for OpenAI's prompt cache",
    "prompt_cache_retention": "how long OpenAI keeps that cache",
    "reasoning": "effort and summary of an OpenAI reasoning model; the program's LM has its own settings",
    "include": "extra output OpenAI can add (encrypted reasoning, logprobs, ...)",
    "truncation": "how OpenAI trims a conversation longer than its context",
    "parallel_tool_calls": "meaningful only with tools (which are never called here)",
    "max_tool_calls": "the same",
    "stream_options": "include_obfuscation: no padding is sent",
    "text": "format {\"type\": \"text\"} only (the JSON formats are refused); verbosity is ignored",
    "tools": "an empty list only",
    "tool_choice": "\"none\" or \"auto\"",
    "top_logprobs": "absent or 0 only",
    "background": "false only",
}
# Honoured: model, input, instructions (a system message), max_output_tokens, temperature, top_p, stream.
RESPONSES_REFUSED: dict[str, str] = {
    "previous_response_id, conversation": STATELESS,
    "prompt": "a stored prompt template lives on OpenAI's servers; send the text in `instructions` and `input`",
    "background: true": "there is no stored response to poll; send the request without it",
    "tools (non-empty), tool_choice \"required\" or a named tool": NO_TOOLS,
    "function_call / function_call_output (and other tool) items in input": NO_TOOLS,
    "image, file and audio parts": "a DSPy program reads text only",
    "text.format json_object / json_schema": "not on this route: use /v1/chat/completions' response_format",
    "top_logprobs > 0": "the answer is parsed out of one or more LM calls: it has no log-probabilities",
}

_MESSAGE_KEYS = {"type", "role", "content", "id", "status", "phase"}
_REASONING_KEYS = {"type", "id", "summary", "content", "encrypted_content", "status"}
_PART_KEYS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs"},
              "refusal": {"type", "refusal"}}
_ROLES = ("user", "system", "developer", "assistant")

_INPUT_SCHEMA = {"anyOf": [
    {"type": "string", "description": "the user's message"},
    {"type": "array", "description": "the conversation: message items (role user, system, developer or "
     "assistant; content a string or input_text/output_text parts); reasoning items are accepted and ignored",
     "items": {"type": "object"}},
]}


def _unsupported(message: str, param: str) -> PydanticCustomError:
    return PydanticCustomError("not_supported", "{message}", {"message": message, "param": param})


class ResponsesRequest(OpenAIRequest):
    # Read by conversation_messages, whose errors name the item and part that is wrong.
    input: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    # Accepted and ignored (RESPONSES_IGNORED_FIELDS); the values that would change the answer are refused.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=0)
    stream_options: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    background: bool | None = None
    # Refused unless null (RESPONSES_REFUSED): the state they name is not kept here.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _honourable(self) -> ResponsesRequest:
        if self.previous_response_id is not None:
            raise _unsupported(f"previous_response_id cannot be used: {STATELESS}", "previous_response_id")
        if self.conversation is not None:
            raise _unsupported(f"conversation cannot be used: {STATELESS}", "conversation")
        if self.prompt is not None:
            raise _unsupported("prompt cannot be used: a stored prompt template lives on OpenAI's servers; send "
                               "its text in `instructions` and `input`", "prompt")
        if self.background:
            raise _unsupported(f"background cannot be true: {STATELESS}; send the request without it "
                               "(and stream it if it is long)", "background")
        if self.tools:
            raise _unsupported(f"tools cannot be used: {NO_TOOLS}; leave them out or send []", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise _unsupported(f"tool_choice {json.dumps(self.tool_choice)} asks for a tool call: {NO_TOOLS}",
                               "tool_choice")
        if self.top_logprobs:
            raise _unsupported("top_logprobs is not available: the answer is parsed out of one or more LM calls, so "
                               "it has no token log-probabilities; leave top_logprobs out or 0", "top_logprobs")
        fmt = (self.text or {}).get("format")
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        if fmt is not None and kind != "text":
            raise _unsupported(f"text.format {json.dumps(kind)} is not available on /v1/responses: the answer is the "
                               "program's text; for a JSON answer use /v1/chat/completions with response_format",
                               "text")
        return self

    def token_limit(self) -> int | None:
        return self.max_output_tokens

    def conversation_messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The chat messages `instructions` and `input` make, and where in the request each came from.

        Reasoning items (this server's or OpenAI's, sent back with the rest of an
        answer) are dropped: the next turn sees the answer only, as with chat.
        A GatewayError (400) names the item or part that cannot be read.
        """
        messages: list[dict[str, Any]] = []
        where: list[str] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
            where.append("instructions")
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            where.append("input")
            return messages, where
        if not isinstance(self.input, list) or not self.input:
            raise invalid_request("'input' must be a string or a non-empty list of messages", param="input")
        for i, item in enumerate(self.input):
            message = _input_message(item, f"input[{i}]")
            if message is not None:
                messages.append(message)
                where.append(f"input[{i}]")
        return messages, where


def _input_message(item: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        raise invalid_request(f"{where} must be an object: a message (role and content) or an item", param="input")
    kind = item.get("type", "message")
    if kind == "reasoning":
        _known_keys(item, _REASONING_KEYS, where)
        return None
    if kind == "item_reference":
        raise invalid_request(f"{where} refers to a stored item, but {STATELESS}", param="input",
                              code="unsupported_parameter")
    if not isinstance(kind, str) or kind != "message":
        shown = _shown(kind) if isinstance(kind, str) else type(kind).__name__
        reason = NO_TOOLS if "call" in shown or "tool" in shown else \
            "a DSPy program reads messages: send message items (role and content)"
        raise invalid_request(f"{where} is a '{shown}' item: {reason}", param="input", code="unsupported_parameter")
    _known_keys(item, _MESSAGE_KEYS, where)
    role, content = item.get("role"), item.get("content")
    if role not in _ROLES:
        raise invalid_request(f"{where}.role {json.dumps(role)} is not supported; use one of {', '.join(_ROLES)}",
                              param="input")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise invalid_request(f"{where}.content must be a string or a list of input_text parts", param="input")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        part_kind = part.get("type") if isinstance(part, dict) else None
        if part_kind not in _PART_KEYS:
            shown = _shown(part_kind) if isinstance(part_kind, str) else type(part).__name__
            raise invalid_request(f"{at} is a '{shown}' part; only text content is supported (input_text, or "
                                  "output_text in an assistant message)", param="input")
        _known_keys(part, _PART_KEYS[part_kind], at)
        if part_kind == "refusal":
            continue  # OpenAI's refusal text, sent back with an assistant answer: ignored
        if not isinstance(part.get("text"), str):
            raise invalid_request(f"{at}.text must be a string", param="input")
        parts.append({"type": "text", "text": part["text"]})
    return {"role": role, "content": parts or ""}


def _known_keys(item: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(item) - known)
    if unknown:
        raise invalid_request(f"unknown field '{where}.{_shown(unknown[0])}'", param="input")


def _shown(text: str) -> str:
    """Client text as it may be echoed in an error: a lone surrogate is shown escaped, not raised."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- the wire: responses ----------------------------------------------------------
Status = Literal["completed", "incomplete", "in_progress", "failed"]


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    status: Status = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    """The program's reasoning, as text (no encrypted_content: there is nothing to decrypt)."""

    type: Literal["reasoning"] = "reasoning"
    id: str = Field(default_factory=lambda: f"rs_{uuid.uuid4().hex}")
    status: Status = "completed"
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        return cls(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens)


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """A Response, with every field the openai SDK's `Response` requires."""

    id: str = Field(default_factory=response_id)
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Status = "completed"
    completed_at: int | None = None
    model: str
    output: list[OutputMessage | ReasoningItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: str = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    previous_response_id: None = None
    background: bool = False
    user: str | None = None
    store: bool = False  # nothing is kept, whatever the request said

    @classmethod
    def for_request(cls, body: ResponsesRequest, model: str) -> ResponseObject:
        """The response's echo of the request (status in_progress, no output yet)."""
        return cls(model=model, status="in_progress", instructions=body.instructions, metadata=body.metadata or {},
                   max_output_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
                   parallel_tool_calls=body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
                   tool_choice=body.tool_choice if isinstance(body.tool_choice, str) else "auto",
                   truncation=body.truncation or "disabled", user=body.user)

    def finish(self, output: list[OutputMessage | ReasoningItem], usage: Usage, incomplete: bool) -> None:
        self.output = output
        self.usage = ResponseUsage.of(usage)
        self.status = "incomplete" if incomplete else "completed"
        self.incomplete_details = IncompleteDetails() if incomplete else None
        self.completed_at = None if incomplete else int(time.time())


def _output(reasoning: str | None, content: str, incomplete: bool) -> list[OutputMessage | ReasoningItem]:
    status: Status = "incomplete" if incomplete else "completed"
    items: list[OutputMessage | ReasoningItem] = []
    if reasoning:
        items.append(ReasoningItem(content=[ReasoningText(text=reasoning)]))
    items.append(OutputMessage(status=status, content=[OutputText(text=content)]))
    return items


# -- the service ------------------------------------------------------------------
class ResponsesService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat  # the conversation's limits, truncation and errors are chat completions' own

    def conversation(self, body: ResponsesRequest) -> Conversation:
        """The conversation, checked like a chat request's; errors name `input`'s items."""
        messages, where = body.conversation_messages()
        try:
            return self.chat.validate(messages)
        except GatewayError as error:
            if error.param == "messages":
                error.message = _renamed(error.message, where)
                error.args = (error.message,)
                error.param = "input"
            raise

    async def create(self, host: ProgramHost, body: ResponsesRequest, info: dict) -> Response:
        conversation, settings = self.conversation(body), body.lm_settings()
        response = ResponseObject.for_request(body, host.name)
        if body.stream:
            return EventSourceResponse(self._stream(host, conversation, settings, response, info), sep="\n",
                                       ping=15)
        prediction, finish = await self.chat.answer(host, conversation, settings, info.get("trace"))
        usage = record_usage(info, prediction)
        incomplete = finish == "length"
        response.finish(_output(host.reasoning(prediction), host.content(prediction), incomplete), usage, incomplete)
        return Response(response.model_dump_json(), media_type="application/json")

    async def _stream(self, host: ProgramHost, conversation: Conversation, settings: dict,
                      response: ResponseObject, info: dict) -> AsyncIterator[dict]:
        events = _Events(response)
        yield events.send("response.created", response=response.model_dump())
        yield events.send("response.in_progress", response=response.model_dump())
        prediction, incomplete = None, False
        try:
            async for item in within(host.stream(conversation, settings, info.get("trace")),
                                    deadline(self.chat.timeout)):
                if isinstance(item, Delta):
                    info.setdefault("first_token", time.perf_counter())
                    for event in events.delta(item.field, item.text):
                        yield event
                else:
                    prediction = item
            incomplete = self.chat.finish_reason(host, prediction, settings) == "length"
        except Exception as exc:
            if self.chat.cut_short(exc, settings) is None:
                # The status line is already sent: the failure travels as events.
                error = from_program_failure(exc, settings)
                for event in events.failed(error):
                    yield event
                return
            # Cut short by max_output_tokens: the rest of what the LM wrote, then status "incomplete".
            incomplete = True
            partial = dspy.Prediction(**partial_outputs(exc.lm_response, list(exc.signature.output_fields)))
            texts = {"reasoning": host.reasoning(partial) or ""}
            if host.program.streams_answer or not events.sent["content"]:
                texts["content"] = host.content(partial)
            for label, text in texts.items():
                sent = events.sent[label]
                if text.startswith(sent) and len(text) > len(sent):
                    for event in events.delta(label, text[len(sent):]):
                        yield event
        usage = record_usage(info, prediction)
        for event in events.finish(usage, incomplete):
            yield event


def _renamed(message: str, where: list[str]) -> str:
    """A chat error about `messages[i]` said about the request item message i came from."""
    def item(match: re.Match) -> str:
        index = int(match.group(1))
        if index >= len(where):
            return match.group(0)
        # `input` as a string and `instructions` are the message's text themselves; an item has a content.
        content = match.group(2) or ""
        return where[index] + (content if where[index].startswith("input[") else "")

    return re.sub(r"\bmessages\[(\d+)\](\.content)?", item, message).replace("messages has", "the input has")


class _Events:
    """The Responses event stream of one answer: output items opened as their text arrives (the reasoning
    first, if the program reasons, then the message), each event numbered."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.number = 0
        self.sent = {"reasoning": "", "content": ""}
        self.items: list[OutputMessage | ReasoningItem] = []
        self.open: OutputMessage | ReasoningItem | None = None

    def send(self, kind: str, **fields: Any) -> dict:
        data = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return {"event": kind, "data": json.dumps(data)}

    def delta(self, label: str, text: str) -> list[dict]:
        events: list[dict] = []
        if label == "reasoning":
            if any(isinstance(i, OutputMessage) for i in self.items):
                return events  # the answer has begun: the response's reasoning item is already closed
            if self.open is None:
                events += self._open(ReasoningItem(status="in_progress"), ReasoningText(text=""))
            self.sent["reasoning"] += text
            events.append(self._part_event("response.reasoning_text.delta", delta=text))
            return events
        if not isinstance(self.open, OutputMessage):
            events += self._close(incomplete=False)
            events += self._open(OutputMessage(status="in_progress"), OutputText(text=""))
        self.sent["content"] += text
        events.append(self._part_event("response.output_text.delta", delta=text, logprobs=[]))
        return events

    def finish(self, usage: Usage, incomplete: bool) -> list[dict]:
        events: list[dict] = []
        if not any(isinstance(i, OutputMessage) for i in self.items):  # an empty answer is still a message
            events += self._close(incomplete=False)
            events += self._open(OutputMessage(status="in_progress"), OutputText(text=""))
        events += self._close(incomplete)
        self.response.finish(self.items, usage, incomplete)
        kind = "response.incomplete" if incomplete else "response.completed"
        events.append(self.send(kind, response=self.response.model_dump()))
        return events

    def failed(self, error: GatewayError) -> list[dict]:
        """An `error` event with the gateway's error, then `response.failed`."""
        events = [self.send("error", code=error.code or error.type, message=error.message, param=error.param)]
        self.response.status = "failed"
        code = "rate_limit_exceeded" if error.status == 429 else "server_error" if error.status >= 500 \
            else "invalid_prompt"
        self.response.error = ResponseError(code=code, message=error.message)
        self.response.output = self.items
        events.append(self.send("response.failed", response=self.response.model_dump()))
        return events

    def _open(self, item: OutputMessage | ReasoningItem, part: OutputText | ReasoningText) -> list[dict]:
        self.open = item
        self.items.append(item)
        events = [self.send("response.output_item.added", output_index=len(self.items) - 1,
                            item=item.model_dump())]
        item.content.append(part)
        events.append(self._part_event("response.content_part.added", part=part.model_dump()))
        return events

    def _close(self, incomplete: bool) -> list[dict]:
        item = self.open
        if item is None:
            return []
        self.open = None
        part = item.content[0]
        if isinstance(item, ReasoningItem):
            part.text = self.sent["reasoning"]
            done = [self._part_event("response.reasoning_text.done", text=part.text, item=item)]
        else:
            part.text = self.sent["content"]
            done = [self._part_event("response.output_text.done", text=part.text, logprobs=[], item=item)]
        item.status = "incomplete" if incomplete and isinstance(item, OutputMessage) else "completed"
        done.append(self._part_event("response.content_part.done", part=part.model_dump(), item=item))
        done.append(self.send("response.output_item.done", output_index=self.items.index(item),
                              item=item.model_dump()))
        return done

    def _part_event(self, kind: str, item: OutputMessage | ReasoningItem | None = None, **fields: Any) -> dict:
        item = item or self.open
        return self.send(kind, item_id=item.id, output_index=self.items.index(item), content_index=0, **fields)

