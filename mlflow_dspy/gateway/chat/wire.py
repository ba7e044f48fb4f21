"""Chat completions on the wire: the request (checked strictly, as OpenAI checks it), the completion and the
chunks of its stream.

The request's messages are read once, into the `Conversation` the program is handed
(`conversation_of`); what a program cannot honour once it is known (a response_format
that is not its outputs, a forced tool it cannot call) is refused then (`answer_shape`).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
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
from mlflow_dspy.gateway.openai_wire import MAX_COMPLETION_TOKENS, NO_TOOLS, Strict, unsupported
from mlflow_dspy.program.chat import Conversation, Message
from mlflow_dspy.runtime.run import Usage

if TYPE_CHECKING:
    from mlflow_dspy.program.chat import ChatProgram

MAX_STOP_SEQUENCES = 4

# Accepted and ignored: OpenAI takes them, SDKs and agent frameworks send them, and none can change
# what a DSPy program answers. (The README's table is this list.)
IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id, for the provider's abuse monitoring",
    "safety_identifier": "the same, under its newer name",
    "metadata": "tags for OpenAI's stored completions (string values)",
    "store": "whether OpenAI keeps the completion; the gateway keeps none (its traces are MLflow's)",
    "service_tier": "OpenAI's processing tier",
    "prompt_cache_key": "a hint for OpenAI's prompt cache",
    "prompt_cache_retention": "how long OpenAI keeps that cache",
    "reasoning_effort": "how hard an OpenAI reasoning model thinks; the program's LM has its own settings",
    "verbosity": "how long a GPT-5 answer should be; the program's signature decides its outputs",
    "prediction": "predicted output, to speed up an OpenAI model; it never changes the answer",
    "parallel_tool_calls": "at most one call is made: the forced one (see structured.py)",
    "logprobs": "false only (true is refused)",
    "top_logprobs": "absent or 0 only",
    "logit_bias": "empty only (a bias on token ids is refused)",
    "modalities": '["text"] only',
    "audio": "null only",
    "presence_penalty": "not passed to the program's LM",
    "frequency_penalty": "not passed to the program's LM",
    "stream_options": "include_usage is honoured; include_obfuscation is ignored (no padding is sent)",
}
# Honoured (they reach the program's LM, or shape the answer): temperature, top_p, max_tokens,
# max_completion_tokens, stop, seed, stream, stream_options.include_usage, response_format, and tools with
# tool_choice (and the deprecated functions with function_call): with tool_choice absent, "auto" or "none"
# the program answers in text, as a model that chose not to call a tool; a forced function whose parameters
# are the program's outputs is answered as a call of it (structured.py).
# Refused with a 400 that says why: they would change the answer, and a DSPy program cannot honour them.
REFUSED: dict[str, str] = {
    "n > 1": "a DSPy program gives one answer per request",
    "logprobs: true, top_logprobs > 0": "the answer is parsed out of one or more LM calls: it has no log-probabilities",
    "logit_bias (non-empty)": "token ids of an LM the client does not choose",
    "modalities with \"audio\", audio (non-null)": "a DSPy program answers in text",
    "tool_choice \"required\" or a named function whose parameters are not the program's outputs": "a DSPy "
        "program calls no tool of the client's: it can only answer with its own outputs",
    "tool / function messages, assistant messages with tool_calls": "there are no tool calls to answer",
    "response_format json_schema whose properties differ from the program's outputs": "the program's outputs "
        "are its signature's",
}
# What an assistant message carries when a client sends back a reply it got (from this gateway or from
# OpenAI): accepted and ignored, so `messages.append(response.choices[0].message)` works.
IGNORED_MESSAGE_FIELDS: dict[str, str] = {
    "name": "a participant's name (any role)",
    "reasoning_content": "this gateway's (and DeepSeek's, vLLM's) reasoning: the next turn sees the answer only",
    "refusal": "OpenAI's refusal text (null from this gateway)",
    "tool_calls": "null or an empty list (a non-empty list is refused)",
    "function_call": "null only",
    "audio": "null only",
    "annotations": "OpenAI's URL citations",
}


class OpenAIRequest(Strict):
    """What the chat and the Responses requests both take: the model, sampling, streaming, and the
    client-side fields OpenAI accepts that cannot change a DSPy program's answer (accepted and ignored)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    def token_limit(self) -> int | None:
        """The most tokens the client lets the answer have (each protocol names it its own way)."""
        return None

    def lm_settings(self) -> dict[str, Any]:
        """Per-request LM settings, for `lm.copy(**settings)`, named as DSPy's LMs name them."""
        settings: dict[str, Any] = {}
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        if self.top_p is not None:
            settings["top_p"] = self.top_p
        limit = self.token_limit()
        if limit is not None:
            settings["max_tokens"] = limit
        return settings



class ChatMessage(Strict):
    role: str
    # A list of parts is accepted here so the chat wrapper can refuse image
    # parts by name; it joins text parts.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # Accepted and ignored (IGNORED_MESSAGE_FIELDS).
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: None = None
    audio: None = None
    annotations: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_tool_traffic(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        role = data.get("role")
        if role in ("tool", "function"):
            raise unsupported(f"a '{role}' message carries a tool's result, but {NO_TOOLS}; "
                               "send user, assistant, system or developer messages", "messages")
        if data.get("tool_calls"):
            raise unsupported(f"an assistant message with tool_calls cannot be continued: {NO_TOOLS}",
                               "messages")
        if data.get("function_call") is not None:
            raise unsupported(f"an assistant message with a function_call cannot be continued: {NO_TOOLS}",
                               "messages")
        if data.get("audio") is not None:
            raise unsupported("a message's audio cannot be read: a DSPy program takes text only", "messages")
        return data


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: no obfuscation padding is sent


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, description="only n=1 is supported")
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Accepted and ignored (IGNORED_FIELDS); the few values that would change the answer are refused.
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, int | float] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes 1 to {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _honourable(self) -> ChatCompletionRequest:
        if self.n is not None and self.n > 1:
            raise unsupported(f"'n' must be 1 (it is {self.n}): a DSPy program gives one answer per request; "
                               "send several requests for several answers", "n")
        if self.logprobs:
            raise unsupported("logprobs is not available: the answer is parsed out of one or more LM calls, so "
                               "it has no token log-probabilities; leave logprobs out or false", "logprobs")
        if self.top_logprobs:
            raise unsupported("top_logprobs is not available: the answer has no token log-probabilities; "
                               "leave top_logprobs out or 0", "top_logprobs")
        if self.logit_bias:
            raise unsupported("logit_bias cannot be honoured: it biases token ids of the program's own LM, "
                               "which the client does not choose; leave it out or empty", "logit_bias")
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise unsupported("this model answers in text only: modalities must be [\"text\"]", "modalities")
        if self.audio is not None:
            raise unsupported("this model answers in text only: leave audio out", "audio")
        if self.tools or self.tool_choice is not None:
            check_tools(self.tools, self.tool_choice, "tools", "tool_choice")
        if self.functions or self.function_call is not None:
            check_tools(self.functions, self.function_call, "functions", "function_call")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def lm_settings(self) -> dict[str, Any]:
        settings = super().lm_settings()
        if self.stop:
            settings["stop"] = self.stop
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings

    def answer_shape(self, program: ChatProgram) -> AnswerShape:
        """How the client asks the answer to be: a call of a forced function whose parameters are the program's
        outputs (structured output through a tool), the JSON object `response_format` asks for, or the usual
        answer. What the program cannot give is a 400 naming the field (structured.py)."""
        if self.tools or self.functions:
            tool = forced_tool(self.tools or self.functions, self.tool_choice if self.tools else self.function_call,
                               program, "tool_choice" if self.tools else "function_call")
            if tool is not None:
                return tool
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return USUAL
        if fmt.type == "json_object":
            return json_object(program)
        return AnswerShape(schema_fields(fmt.json_schema.schema_, program,
                                         f"response_format json_schema '{fmt.json_schema.name}'", "response_format"))


def conversation_of(messages: list[ChatMessage]) -> Conversation:
    """Validated messages as the one Conversation the program is handed; a ChatInputError names the message."""
    return Conversation.of([Message(m.role, m.content, f"messages[{i}]") for i, m in enumerate(messages)])


# -- the answer ---------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# A call the client forced is answered as one, with finish_reason "tool_calls".
WireFinishReason = Literal["stop", "length", "tool_calls"]


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class FunctionCall(BaseModel):
    name: str
    arguments: str  # the JSON object of the program's outputs


class ToolCall(BaseModel):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None  # only with a forced call: left out otherwise

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = serialize(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: WireFinishReason = "stop"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None  # the version that answered: NAME/VERSION, or the run id


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: WireFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
