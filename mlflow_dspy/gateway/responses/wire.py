"""The Responses API on the wire: the request (strict, like the chat request; its `input` read into typed
items), and the Response object and the stream events the official openai SDK parses.

The server is stateless: nothing is stored, so `previous_response_id` (and `conversation`, `prompt`,
`background`) get a 400; the client sends the whole conversation in `input`, as with chat completions.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from mlflow_dspy.gateway.chat.structured import (
    USUAL,
    AnswerShape,
    check_tools,
    forced_tool,
    json_object,
    schema_fields,
)
from mlflow_dspy.gateway.chat.wire import OpenAIRequest
from mlflow_dspy.gateway.errors import invalid_request
from mlflow_dspy.gateway.openai_wire import MAX_COMPLETION_TOKENS, NO_TOOLS, Strict, shown, unsupported
from mlflow_dspy.program.chat import ChatProgram, Message
from mlflow_dspy.runtime.run import ToolStep, Usage

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
    "parallel_tool_calls": "at most one call is made: the forced one",
    "max_tool_calls": "the same",
    "stream_options": "include_obfuscation: no padding is sent",
    "text.verbosity": "how long a GPT-5 answer should be; the program's signature decides its outputs",
    "top_logprobs": "absent or 0 only",
    "background": "false only",
}
# Honoured: model, input, instructions (a system message), max_output_tokens, temperature, top_p, stream,
# text.format (text, json_object, json_schema: chat's response_format rules), tools with tool_choice (chat's
# rules: answered in text unless a function whose parameters are the program's outputs is forced, which is
# answered as a function_call item).
RESPONSES_REFUSED: dict[str, str] = {
    "previous_response_id, conversation": STATELESS,
    "prompt": "a stored prompt template lives on OpenAI's servers; send the text in `instructions` and `input`",
    "background: true": "there is no stored response to poll; send the request without it",
    "tool_choice \"required\" or a named function whose parameters are not the program's outputs": NO_TOOLS,
    "function_call / function_call_output (and other tool) items in input": NO_TOOLS,
    "image, file and audio parts": "a DSPy program reads text only",
    "text.format json_schema whose properties differ from the program's outputs": "the program's outputs are "
        "its signature's",
    "top_logprobs > 0": "the answer is parsed out of one or more LM calls: it has no log-probabilities",
}

_ROLES = ("user", "system", "developer", "assistant")
_INPUT_SCHEMA = {"anyOf": [
    {"type": "string", "description": "the user's message"},
    {"type": "array", "description": "the conversation: message items (role user, system, developer or "
     "assistant; content a string or input_text/output_text parts); reasoning items are accepted and ignored",
     "items": {"type": "object"}},
]}


# -- `input`'s items, each of its kind -----------------------------------------------
class _Loose(BaseModel):
    # Known keys only (an unknown one is named); values as they come: only what is read is checked.
    model_config = ConfigDict(extra="forbid")


class InputTextPart(_Loose):
    type: Literal["input_text"]
    text: Annotated[str, Field(strict=True)]


class OutputTextPart(_Loose):
    type: Literal["output_text"]
    text: Annotated[str, Field(strict=True)]
    annotations: Any = None
    logprobs: Any = None


class RefusalPart(_Loose):
    """OpenAI's refusal text, sent back with an assistant answer: ignored."""

    type: Literal["refusal"]
    refusal: Any = None


def _part_kind(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    return kind if isinstance(kind, str) else type(part).__name__


Part = Annotated[Annotated[InputTextPart, Tag("input_text")] | Annotated[OutputTextPart, Tag("output_text")]
                 | Annotated[RefusalPart, Tag("refusal")], Discriminator(_part_kind)]


def _content_kind(content: Any) -> str | None:
    return "string" if isinstance(content, str) else "parts" if isinstance(content, list) else None


Content = Annotated[Annotated[str, Tag("string")] | Annotated[list[Part], Tag("parts")], Discriminator(_content_kind)]


class MessageItem(_Loose):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content
    id: Any = None
    status: Any = None
    phase: Any = None

    def message(self, where: str) -> Message:
        if isinstance(self.content, str):
            return Message(self.role, self.content, where)
        parts = [{"type": "text", "text": p.text} for p in self.content if not isinstance(p, RefusalPart)]
        return Message(self.role, parts or "", where)


class ReasoningInputItem(_Loose):
    """A reasoning item (this server's or OpenAI's, sent back with an answer): dropped, as chat drops
    reasoning_content: the next turn sees the answer only."""

    type: Literal["reasoning"]
    id: Any = None
    summary: Any = None
    content: Any = None
    encrypted_content: Any = None
    status: Any = None


def _item_kind(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    kind = item.get("type", "message")
    return kind if isinstance(kind, str) else type(kind).__name__


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[ReasoningInputItem, Tag("reasoning")],
                      Discriminator(_item_kind)]
_ITEMS = TypeAdapter(list[InputItem])
# The union members' tags pydantic puts in an error's location; none is a field's name.
_TAGS = {"message", "reasoning", "string", "parts", "input_text", "output_text", "refusal"}


def _input_problem(error: dict[str, Any]) -> tuple[str, str | None]:
    """What is wrong with an item of `input`, in words that name it (input[2].content[0]), and the error code."""
    loc = [part for part in error["loc"] if part not in _TAGS and not (isinstance(part, str) and "[" in part)]
    at = "input" + "".join(f"[{p}]" if isinstance(p, int) else f".{shown(str(p))}" for p in loc[:-1])
    where = at + (f"[{loc[-1]}]" if isinstance(loc[-1], int) else f".{shown(str(loc[-1]))}")
    kind, tag = error["type"], str((error.get("ctx") or {}).get("tag", ""))
    if kind == "extra_forbidden":
        return f"unknown field '{where}'", None
    if len(loc) == 1:  # the item itself
        if kind == "union_tag_not_found":
            return f"{where} must be an object: a message (role and content) or an item", None
        if tag == "item_reference":
            return f"{where} refers to a stored item, but {STATELESS}", "unsupported_parameter"
        reason = NO_TOOLS if "call" in tag or "tool" in tag else \
            "a DSPy program reads messages: send message items (role and content)"
        return f"{where} is a '{shown(tag)}' item: {reason}", "unsupported_parameter"
    if loc[-1] == "role":
        role = None if kind == "missing" else error.get("input")
        return f"{where} {json.dumps(role)} is not supported; use one of {', '.join(_ROLES)}", None
    if loc[-1] == "content":
        return f"{where} must be a string or a list of input_text parts", None
    if kind.startswith("union_tag"):  # a part of a message's content
        return (f"{where} is a '{shown(tag)}' part; only text content is supported (input_text, or output_text in "
                "an assistant message)"), None
    return f"{where} must be a string", None


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(Strict):
    """The Responses API's json_schema format: chat's `json_schema` object, flattened."""

    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")] | None = None
    verbosity: str | None = None  # ignored


class ResponsesRequest(OpenAIRequest):
    # Read by `messages`: items, each checked against its kind (InputItem); errors name the item and part.
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
    text: TextConfig | None = None
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
            raise unsupported(f"previous_response_id cannot be used: {STATELESS}", "previous_response_id")
        if self.conversation is not None:
            raise unsupported(f"conversation cannot be used: {STATELESS}", "conversation")
        if self.prompt is not None:
            raise unsupported("prompt cannot be used: a stored prompt template lives on OpenAI's servers; send "
                               "its text in `instructions` and `input`", "prompt")
        if self.background:
            raise unsupported(f"background cannot be true: {STATELESS}; send the request without it "
                               "(and stream it if it is long)", "background")
        if self.tools or self.tool_choice is not None:
            check_tools(self.tools, self.tool_choice, "tools", "tool_choice")
        if self.top_logprobs:
            raise unsupported("top_logprobs is not available: the answer is parsed out of one or more LM calls, so "
                               "it has no token log-probabilities; leave top_logprobs out or 0", "top_logprobs")
        return self

    def answer_shape(self, program: ChatProgram) -> AnswerShape:
        """How the client asks the answer to be, under chat's rules (structured.py): a call of a forced function
        whose parameters are the program's outputs, the JSON object `text.format` asks for, or the usual text."""
        if self.tools:
            tool = forced_tool(self.tools, self.tool_choice, program, "tool_choice")
            if tool is not None:
                return tool
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return USUAL
        if fmt.type == "json_object":
            return json_object(program)
        return AnswerShape(schema_fields(fmt.schema_, program, f"text.format json_schema '{fmt.name}'", "text"))

    def token_limit(self) -> int | None:
        return self.max_output_tokens

    def messages(self) -> list[Message]:
        """The messages `instructions` and `input` make, each with where in the request it came from.

        A 400 names the item or part that cannot be read. Reasoning items are dropped: the next turn sees
        the answer only, as with chat.
        """
        messages = [Message("system", self.instructions, "instructions", "instructions")] if self.instructions else []
        if isinstance(self.input, str):
            return [*messages, Message("user", self.input, "input", "input")]
        if not isinstance(self.input, list) or not self.input:
            raise invalid_request("'input' must be a string or a non-empty list of messages", param="input")
        try:
            items = _ITEMS.validate_python(self.input)
        except ValidationError as exc:
            message, code = _input_problem(exc.errors()[0])
            raise invalid_request(message, param="input", code=code) from None
        return [*messages, *(item.message(f"input[{i}]") for i, item in enumerate(items)
                             if isinstance(item, MessageItem))]


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


class FunctionCallItem(BaseModel):
    """A call of the function the client forced, its arguments the program's outputs (structured output)."""

    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: f"fc_{uuid.uuid4().hex}")
    call_id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    name: str
    arguments: str
    status: Status = "completed"


class FunctionCallOutputItem(BaseModel):
    """What a tool the program ran returned (with the FunctionCallItem of its call before it): the server ran
    it; the client need not."""

    type: Literal["function_call_output"] = "function_call_output"
    id: str = Field(default_factory=lambda: f"fco_{uuid.uuid4().hex}")
    call_id: str
    output: str
    status: Literal["completed"] = "completed"


OutputItem = OutputMessage | ReasoningItem | FunctionCallItem | FunctionCallOutputItem


def step_items(step: ToolStep) -> tuple[FunctionCallItem, FunctionCallOutputItem]:
    """A tool the program called, as the call and its output."""
    call = FunctionCallItem(name=step.name, arguments=json.dumps(step.arguments, default=str))
    return call, FunctionCallOutputItem(call_id=call.call_id, output=step.output)


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
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: str | dict[str, Any] = "auto"
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
                   tool_choice=body.tool_choice if body.tool_choice is not None else "auto", tools=body.tools or [],
                   text={"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
                   if body.text is not None and body.text.format is not None else {"format": {"type": "text"}},
                   truncation=body.truncation or "disabled", user=body.user)

    def finish(self, output: list[OutputItem], usage: Usage, incomplete: bool) -> None:
        self.output = output
        self.usage = ResponseUsage.of(usage)
        self.status = "incomplete" if incomplete else "completed"
        self.incomplete_details = IncompleteDetails() if incomplete else None
        self.completed_at = None if incomplete else int(time.time())
