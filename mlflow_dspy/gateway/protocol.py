"""The wire protocol, in one place: OpenAI chat completions, the typed
/predict endpoints, and the OpenAI error object.

Requests are validated strictly: an unknown field or a value out of range is a
400 that names the field, rather than a silently ignored setting. Fields that
OpenAI accepts and that cannot change a DSPy program's answer are accepted and
ignored (`IGNORED_FIELDS`, `IGNORED_MESSAGE_FIELDS`); fields that would change
the answer and cannot be honoured are refused with a 400 that says why
(`REFUSED`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

import dspy
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mlflow_dspy.program.chat import history_entries
from mlflow_dspy.program.mapping import Field as ProgramField
from mlflow_dspy.program.mapping import fields_model
from mlflow_dspy.runtime.field_stream import FieldStream
from mlflow_dspy.runtime.host import as_text

if TYPE_CHECKING:
    from mlflow_dspy.program.chat import ChatProgram

MAX_STOP_SEQUENCES = 4
MAX_COMPLETION_TOKENS = 8192


class Strict(BaseModel):
    # No unknown fields, and no coercion: "yes" is not a boolean, "0.5" is not a number (as with OpenAI).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# -- OpenAI: requests ---------------------------------------------------------
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
    "parallel_tool_calls": "meaningful only with tools (which are never called here)",
    "logprobs": "false only (true is refused)",
    "top_logprobs": "absent or 0 only",
    "logit_bias": "empty only (a bias on token ids is refused)",
    "modalities": '["text"] only',
    "audio": "null only",
    "presence_penalty": "not passed to the program's LM",
    "frequency_penalty": "not passed to the program's LM",
    "stream_options": "include_usage is honoured; include_obfuscation is ignored (no padding is sent)",
    "tools": "an empty list; or tools with tool_choice \"none\" (the model then answers in text, as a DSPy "
             "program always does)",
    "tool_choice": "\"none\" or \"auto\" when no tools are sent, \"none\" when tools are sent",
    "functions": "the deprecated form of tools, under the same rules",
    "function_call": "the deprecated form of tool_choice, under the same rules",
}
# Honoured (they reach the program's LM, or shape the answer): temperature, top_p, max_tokens,
# max_completion_tokens, stop, seed, stream, stream_options.include_usage, response_format.
# Refused with a 400 that says why: they would change the answer, and a DSPy program cannot honour them.
REFUSED: dict[str, str] = {
    "n > 1": "a DSPy program gives one answer per request",
    "logprobs: true, top_logprobs > 0": "the answer is parsed out of one or more LM calls: it has no log-probabilities",
    "logit_bias (non-empty)": "token ids of an LM the client does not choose",
    "modalities with \"audio\", audio (non-null)": "a DSPy program answers in text",
    "tools (non-empty) unless tool_choice is \"none\"; tool_choice \"required\" or a named function": "a DSPy "
        "program answers in text and never calls tools",
    "tool / function messages, assistant messages with tool_calls": "there are no tool calls to answer",
    "response_format json_schema whose properties differ from the program's outputs": "the program's outputs "
        "are its signature's",
    "response_format json_object for a program whose answer is one text field": "its answer is not a JSON object",
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
NO_TOOLS = "this model is a DSPy program: it answers in text and never calls tools"


def _unsupported(message: str, param: str) -> PydanticCustomError:
    """A 400 whose message is said as it is (see errors.validation_message), for a field the gateway cannot honour."""
    return PydanticCustomError("not_supported", "{message}", {"message": message, "param": param})


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
            raise _unsupported(f"a '{role}' message carries a tool's result, but {NO_TOOLS}; "
                               "send user, assistant, system or developer messages", "messages")
        if data.get("tool_calls"):
            raise _unsupported(f"an assistant message with tool_calls cannot be continued: {NO_TOOLS}",
                               "messages")
        if data.get("function_call") is not None:
            raise _unsupported(f"an assistant message with a function_call cannot be continued: {NO_TOOLS}",
                               "messages")
        if data.get("audio") is not None:
            raise _unsupported("a message's audio cannot be read: a DSPy program takes text only", "messages")
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


class Unsupported(ValueError):
    """A request this program cannot honour, found once the program is known: a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


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
            raise _unsupported(f"'n' must be 1 (it is {self.n}): a DSPy program gives one answer per request; "
                               "send several requests for several answers", "n")
        if self.logprobs:
            raise _unsupported("logprobs is not available: the answer is parsed out of one or more LM calls, so "
                               "it has no token log-probabilities; leave logprobs out or false", "logprobs")
        if self.top_logprobs:
            raise _unsupported("top_logprobs is not available: the answer has no token log-probabilities; "
                               "leave top_logprobs out or 0", "top_logprobs")
        if self.logit_bias:
            raise _unsupported("logit_bias cannot be honoured: it biases token ids of the program's own LM, "
                               "which the client does not choose; leave it out or empty", "logit_bias")
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise _unsupported("this model answers in text only: modalities must be [\"text\"]", "modalities")
        if self.audio is not None:
            raise _unsupported("this model answers in text only: leave audio out", "audio")
        self._tools_fit("tools", self.tools, "tool_choice", self.tool_choice)
        self._tools_fit("functions", self.functions, "function_call", self.function_call)
        return self

    @staticmethod
    def _tools_fit(tools_name: str, tools: list | None, choice_name: str, choice: Any) -> None:
        if tools and choice != "none":
            shown = "absent, which means \"auto\"" if choice is None else json.dumps(choice)
            raise _unsupported(f"{tools_name} cannot be used: {NO_TOOLS}; send {tools_name} only with "
                               f"{choice_name} \"none\" (it is {shown}), or leave them out", tools_name)
        if not tools and choice not in (None, "none", "auto"):
            raise _unsupported(f"{choice_name} {json.dumps(choice)} asks for a tool call: {NO_TOOLS}", choice_name)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def lm_settings(self) -> dict[str, Any]:
        settings = super().lm_settings()
        if self.stop:
            settings["stop"] = self.stop
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings

    def message_dicts(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def json_answer(self, program: ChatProgram) -> tuple[str, ...] | None:
        """The fields of the JSON object the response_format asks the answer to be; None: the usual answer.

        `json_object` is honoured for a program whose chat answer already is a JSON
        object (several answer fields, or one typed as an object). `json_schema` is
        honoured when the schema's properties are the program's answer fields,
        optionally with its other outputs and `reasoning`: the answer is then the
        JSON object of those fields. Anything else cannot be honoured: Unsupported.
        """
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        mapping = program.mapping
        answers = tuple(mapping.answer_fields)
        if fmt.type == "json_object":
            if answers_an_object(program):
                return None  # the usual answer is that object
            raise Unsupported(f"response_format json_object cannot be honoured: this program's answer is the text "
                              f"of its output '{answers[0]}', not a JSON object; leave response_format out, or "
                              f"use json_schema with the property '{answers[0]}'", "response_format")
        schema = fmt.json_schema.schema_ or {}
        properties = schema.get("properties")
        available = [f.name for f in mapping.outputs]
        if program_reasons(program):
            available.append("reasoning")
        wanted = "(" + ", ".join(answers) + (", optionally " + ", ".join(a for a in available if a not in answers)
                                             if len(available) > len(answers) else "") + ")"
        if schema.get("type", "object") != "object" or not isinstance(properties, dict) or not properties:
            raise Unsupported(f"response_format json_schema cannot be honoured: its schema must be an object with "
                              f"properties, the program's outputs {wanted}", "response_format")
        requested = tuple(properties)
        extra = [name for name in requested if name not in available]
        missing = [name for name in answers if name not in requested]
        required = schema.get("required") or []
        if extra or missing or not set(required) <= set(requested):
            problems = [f"it asks for {', '.join(extra)}" if extra else "",
                        f"it leaves out {', '.join(missing)}" if missing else "",
                        "its required fields are not among its properties" if not set(required) <= set(requested)
                        else ""]
            raise Unsupported(f"response_format json_schema '{fmt.json_schema.name}' differs from the program's "
                              f"outputs {wanted}: {'; '.join(p for p in problems if p)}", "response_format")
        return requested


def answers_an_object(program: ChatProgram) -> bool:
    """Whether the program's chat answer is a JSON object: several answer fields, or one typed as an object."""
    fields = program.mapping.answer_fields
    if len(fields) > 1:
        return True
    output = next((f for f in program.mapping.outputs if f.name == fields[0]), None)
    annotation = output.annotation if output else str
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and (issubclass(origin, (dict, BaseModel)) or dataclasses.is_dataclass(origin))


def program_reasons(program: ChatProgram) -> bool:
    return any("reasoning" in p.signature.output_fields for p in program.program.predictors())


def partial_outputs(lm_text: str, fields: list[str]) -> dict[str, str]:
    """The output fields an LM answer cut short holds so far (ChatAdapter markers or JSON), by name."""
    stream = FieldStream(fields)
    stream.feed(lm_text or "")
    return {name: text for name, text in stream.sent.items() if text}


# -- DSPy's adapters, as a client -------------------------------------------------
# A DSPy program whose LM is this gateway sends the prompt its adapter (ChatAdapter, JSONAdapter)
# formats: a system message that lists the input and output fields, and a user message of
# `[[ ## field ## ]]` blocks. Served to the program as it is, the program would answer that prompt as
# if it were the question. So the gateway reads the fields out of it, runs the program on them, and
# answers in the format the adapter parses.
_ADAPTER_MARKS = ("Your input fields are:", "Your output fields are:", "All interactions will be structured")
_LISTED_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)
_REQUEST_TAIL = re.compile(r"\n\nRespond with (?:the corresponding output fields|a JSON object).*\Z", re.DOTALL)


@dataclasses.dataclass
class AdapterPrompt:
    """What a DSPy client asked: its input fields' values, the output fields it parses, and in which format."""

    inputs: dict[str, str]
    outputs: list[str]
    json: bool

    def conversation(self, program: ChatProgram) -> list[dict[str, Any]]:
        """The chat the served program answers: the client's inputs in the places its mapping reads them from."""
        mapping = program.mapping
        inputs = dict(self.inputs)
        messages = []
        if mapping.context_field and mapping.context_field in inputs and len(inputs) > 1:
            messages.append({"role": "system", "content": inputs.pop(mapping.context_field)})
        if mapping.question_field is None:
            question = json.dumps({name: _json_or_text(value) for name, value in inputs.items()})
        elif mapping.question_field in inputs:
            question = inputs[mapping.question_field]
        elif len(inputs) == 1:
            question = next(iter(inputs.values()))
        else:
            question = "\n\n".join(f"{name}: {value}" for name, value in inputs.items())
        messages.append({"role": "user", "content": question})
        return messages

    def reply(self, values: dict[str, Any]) -> str:
        """The answer as the client's adapter parses it: `[[ ## field ## ]]` blocks, or a JSON object."""
        if self.json:
            return json.dumps(values, default=str)
        blocks = [f"[[ ## {name} ## ]]\n{as_text(value)}" for name, value in values.items()]
        return "\n\n".join([*blocks, "[[ ## completed ## ]]"])

    def check(self, program: ChatProgram) -> None:
        """Unsupported when several of the outputs the client asks for are not the program's: which of them
        would get the program's answer?"""
        available = {f.name for f in program.mapping.outputs} | {"reasoning"}
        unmatched = [name for name in self.outputs if name not in available]
        if len(unmatched) > 1:
            raise Unsupported(f"the DSPy client asks for the outputs {', '.join(self.outputs)}, but this program "
                              f"writes {', '.join(program.mapping.answer_fields)}: use a signature whose outputs "
                              "are the program's, or one output (it gets the program's answer)", "messages")

    def values(self, program: ChatProgram, prediction: dspy.Prediction, answer: str,
               reasoning: str | None) -> dict[str, Any]:
        """Each output the client asks for: the program's field of that name, else the program's chat answer
        (`check` made sure at most one such field is asked for), `reasoning` its reasoning."""
        values: dict[str, Any] = {}
        for name in self.outputs:
            if name in prediction:
                value = prediction[name]
            elif name == "reasoning":
                value = reasoning or ""
            else:
                value = answer
            if hasattr(value, "model_dump"):
                value = value.model_dump(mode="json")
            values[name] = value if self.json else as_text(value)
        return values


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def adapter_prompt(messages: list[ChatMessage]) -> AdapterPrompt | None:
    """The fields of a DSPy adapter's prompt, when `messages` is one (None otherwise)."""
    system, last = messages[0], messages[-1]
    if (system.role != "system" or last.role != "user" or not isinstance(system.content, str)
            or not isinstance(last.content, str) or not last.content.startswith("[[ ## ")
            or not all(mark in system.content for mark in _ADAPTER_MARKS)):
        return None
    head = system.content.split(_ADAPTER_MARKS[2], 1)[0]
    listed_inputs, _, listed_outputs = head.partition(_ADAPTER_MARKS[1])
    input_names = _LISTED_FIELD.findall(listed_inputs)
    outputs = _LISTED_FIELD.findall(listed_outputs)
    if not input_names or not outputs:
        return None
    # Split at the markers of the listed inputs only: a value may hold other `[[ ## ... ## ]]` text.
    blocks = re.compile(r"\[\[ ## (" + "|".join(map(re.escape, input_names)) + r") ## \]\]\n")
    parts = blocks.split(last.content)
    inputs = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    if not inputs:
        return None
    last_name = list(inputs)[-1]
    inputs[last_name] = _REQUEST_TAIL.sub("", inputs[last_name])
    inputs = {name: value.strip() for name, value in inputs.items()}
    return AdapterPrompt(inputs, outputs, json="Respond with a JSON object" in last.content)


# -- OpenAI: responses --------------------------------------------------------
FinishReason = Literal["stop", "length"]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None  # the version that answered: NAME/VERSION, or the run id


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlflow-dspy"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors ---------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- /predict ---------------------------------------------------------------------
class Question(Strict):
    """The tutorial's body, `{"text": ...}`: the one text input of a single-input program."""

    text: str = Field(min_length=1)

    @field_validator("text")
    @classmethod
    def _encodable(cls, value: str) -> str:
        value.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError: 400
        return value


class PredictResponse(BaseModel):
    status: Literal["success"] = "success"
    data: dict[str, Any]


# A dspy.History input takes dspy's own shape, {"messages": [...]} (entries keyed by the
# signature's fields), or chat turns, [{"role": "user" | "assistant", "content": ...}].
_HISTORY_SCHEMA = {"anyOf": [
    {"type": "object", "properties": {"messages": {"type": "array", "items": {"type": "object"}}},
     "required": ["messages"], "additionalProperties": False,
     "description": "dspy.History: entries keyed by the signature's field names"},
    {"type": "array", "description": "chat turns, paired into history entries",
     "items": {"type": "object", "additionalProperties": False, "required": ["role", "content"],
               "properties": {"role": {"enum": ["user", "assistant"]}, "content": {"type": "string"}}}},
]}


def _history_from_turns(question_field: str, answer_field: str):
    def convert(value: Any) -> Any:
        if not isinstance(value, list):
            return value  # dspy.History validates it
        for i, turn in enumerate(value):
            if not (isinstance(turn, dict) and set(turn) == {"role", "content"}
                    and turn["role"] in ("user", "assistant") and isinstance(turn["content"], str)):
                raise PydanticCustomError("history_turn", "turn [{i}] must be an object with a 'role' ('user' or "
                                          "'assistant') and a string 'content'", {"i": i})
        return dspy.History(messages=history_entries(value, question_field, answer_field))

    return convert


def _readable(annotation: Any) -> bool:
    try:
        TypeAdapter(annotation).json_schema()
    except Exception:
        return False
    return True


class PredictShape:
    """What /predict takes and answers for one served program, as pydantic models.

    Built once per loaded program (validating a request then costs one pydantic
    call). `inputs` has the program's input fields by name, typed as its
    signature declares them; the history and context inputs are optional, as in
    a chat. `outputs` documents the prediction's fields. `text_field` is the
    input the tutorial's `{"text": ...}` fills, when the program has one text
    input (and no input named `text`).
    """

    def __init__(self, program: ChatProgram) -> None:
        mapping = program.mapping
        self.history_field = mapping.history_field
        # A text context the program requires gets "" when the body has none (a chat without system messages).
        context = mapping.input(mapping.context_field) if mapping.context_field else None
        self.blank_context = context.name if context and context.required and context.annotation is str else None
        fields = []
        for field in mapping.inputs:
            if field.name == mapping.history_field:
                convert = _history_from_turns(mapping.question_field or "question", mapping.answer_fields[0])
                annotation = Annotated[dspy.History, BeforeValidator(convert), WithJsonSchema(_HISTORY_SCHEMA)]
                field = dataclasses.replace(field, annotation=annotation, required=False)
            elif field.name == mapping.context_field:
                field = dataclasses.replace(field, required=False)
            elif not _readable(field.annotation):
                field = dataclasses.replace(field, annotation=Any)  # passed on as the JSON it arrives as
            fields.append(field)
        self.required = tuple(f.name for f in fields if f.required)
        self.inputs = fields_model("PredictInputs", fields)
        names = [f.name for f in fields]
        question = mapping.input(mapping.question_field) if mapping.question_field else None
        self.text_field = question.name if question and question.annotation is str and "text" not in names else None

        outputs = [f if _readable(f.annotation) else dataclasses.replace(f, annotation=Any) for f in mapping.outputs]
        reasons = any("reasoning" in p.signature.output_fields for p in program.program.predictors())
        if reasons and "reasoning" not in [f.name for f in outputs]:
            outputs.insert(0, ProgramField("reasoning", str, True, "the program's reasoning"))
        # Extra keys allowed: the prediction may carry fields of other steps.
        self.outputs = fields_model("PredictOutputs", outputs, extra="allow")
        self.response = create_model("PredictResult", status=(Literal["success"], "success"),
                                     data=(self.outputs, ...))

    def arguments(self, model: BaseModel) -> dict[str, Any]:
        """The program's keyword arguments from a validated body: what was sent, and every required input."""
        inputs = {name: getattr(model, name) for name in type(model).model_fields
                  if name in model.model_fields_set or name in self.required}
        if self.history_field and inputs.get(self.history_field) is None:
            inputs[self.history_field] = dspy.History(messages=[])
        if self.blank_context and inputs.get(self.blank_context) is None:
            inputs[self.blank_context] = ""
        return inputs

    def openapi(self, taken: set[str]) -> tuple[dict, dict, dict[str, dict]]:
        """The request body schema, the 200 response schema and the components they refer to.

        Component names that would clash with `taken` get a `Predict` prefix.
        """
        def schemas(template: str) -> tuple[dict, dict, dict]:
            request = self.inputs.model_json_schema(ref_template=template)
            response = self.response.model_json_schema(ref_template=template)
            defs = {**request.pop("$defs", {}), **response.pop("$defs", {})}
            return request, response, defs

        request, response, defs = schemas("#/components/schemas/{model}")
        if set(defs) & taken:
            request, response, defs = schemas("#/components/schemas/Predict{model}")
            defs = {f"Predict{name}": schema for name, schema in defs.items()}
        components = {**defs, "PredictInputs": request, "PredictResult": response}
        body = {"$ref": "#/components/schemas/PredictInputs"}
        if self.text_field:
            components["PredictText"] = Question.model_json_schema()
            body = {"anyOf": [body, {"$ref": "#/components/schemas/PredictText"}]}
        return body, {"$ref": "#/components/schemas/PredictResult"}, components
