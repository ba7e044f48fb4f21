"""The wire protocol, in one place: OpenAI chat completions, the typed
/predict endpoints, and the OpenAI error object.

Requests are validated strictly: an unknown field or a value out of range is a
400 that names the field, rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import time
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
)
from pydantic_core import PydanticCustomError

from mlflow_dspy.program.chat import history_entries
from mlflow_dspy.program.mapping import Field as ProgramField
from mlflow_dspy.program.mapping import fields_model

if TYPE_CHECKING:
    from mlflow_dspy.program.chat import ChatProgram

MAX_STOP_SEQUENCES = 4
MAX_COMPLETION_TOKENS = 8192


class Strict(BaseModel):
    # No unknown fields, and no coercion: "yes" is not a boolean, "0.5" is not a number (as with OpenAI).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# -- OpenAI: requests ---------------------------------------------------------
class ChatMessage(Strict):
    role: str
    # A list of parts is accepted here so the chat wrapper can refuse image
    # parts by name; it joins text parts.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatCompletionRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Accepted for compatibility with OpenAI clients; they do not change the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes 1 to {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    def lm_settings(self) -> dict[str, Any]:
        """Per-request LM settings, for `lm.copy(**settings)`."""
        settings: dict[str, Any] = {}
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        if self.top_p is not None:
            settings["top_p"] = self.top_p
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            settings["max_tokens"] = limit
        if self.stop:
            settings["stop"] = self.stop
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings

    def message_dicts(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


# -- OpenAI: responses --------------------------------------------------------
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
