"""The wire protocol, in one place: OpenAI chat completions, the tutorial's
/predict endpoints, and the OpenAI error object.

Requests are validated strictly: an unknown field or a value out of range is a
400 that names the field, rather than a silently ignored setting.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


# -- the tutorial's FastAPI endpoints -------------------------------------------
class Question(Strict):
    text: str = Field(min_length=1)

    @field_validator("text")
    @classmethod
    def _encodable(cls, value: str) -> str:
        value.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError: 400
        return value


class PredictResponse(BaseModel):
    status: Literal["success"] = "success"
    data: dict[str, Any]
