"""What the OpenAI-shaped routes share on the wire: strict request models, the model list, how a field that
cannot be honoured is refused, and how client text is echoed in an error.

Requests are validated strictly, as OpenAI does: an unknown field or a value out of range is a 400 that
names the field, rather than a silently ignored setting. Fields that OpenAI accepts and that cannot change
a DSPy program's answer are accepted and ignored (each protocol lists them); fields that would change the
answer and cannot be honoured are refused with a 400 that says why (`unsupported`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

MAX_COMPLETION_TOKENS = 8192
NO_TOOLS = "this model is a DSPy program: it answers in text and never calls tools"


class Strict(BaseModel):
    # No unknown fields, and no coercion: "yes" is not a boolean, "0.5" is not a number (as with OpenAI).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def unsupported(message: str, param: str) -> PydanticCustomError:
    """A validation error said as it is (see errors.validation_message): a field the gateway cannot honour."""
    return PydanticCustomError("not_supported", "{message}", {"message": message, "param": param})


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlflow-dspy"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def shown(text: str, limit: int | None = None) -> str:
    """Client text as it may be echoed in an error: a lone surrogate is shown escaped, not raised."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if limit is None else text[:limit]
