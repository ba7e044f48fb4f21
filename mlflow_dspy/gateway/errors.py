"""Every failure becomes an OpenAI error object with the right status.

No exception text that could carry a stack trace, a file path or a key reaches
a body: client errors echo what the client sent wrong, a failed run says which
kind of failure it was (runtime/run.py), and anything unexpected is a bare 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlflow_dspy.program.failures import Failure
from mlflow_dspy.runtime.run import failure

log = logging.getLogger("mlflow_dspy.gateway")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, failure: Failure) -> GatewayError:
        """A failed run (runtime/run.py) as the error the client gets."""
        headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after else None
        return cls(failure.status, failure.message, failure.kind, failure.param, failure.code, headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unsupported_parameter(message: str, param: str) -> GatewayError:
    """A request that this program cannot honour, found once the program is known: a 400 naming `param`."""
    return invalid_request(message, param=param, code="unsupported_parameter")


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message naming the first invalid field of a pydantic validation error list."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    param = _field_path(first.get("loc", ())) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "not_supported":  # a field the gateway cannot honour: the message says why
        context = first.get("ctx") or {}
        return str(context.get("message") or first.get("msg")), context.get("param") or param
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{param}'", param
    if first.get("type") == "missing":
        if param is None:  # the body itself (FastAPI's word for an empty one)
            return "the request body is not valid JSON", None
        return f"'{param}' is required", param
    # JSON's names for JSON's types, whether pydantic read the JSON itself or the objects json.loads made.
    reason = _JSON_WORDS.get(first.get("type")) or first.get("msg", "is invalid")
    return (f"'{param}': {reason}" if param else f"request body: {reason}"), param


_JSON_WORDS = {"list_type": "Input should be a valid array", "dict_type": "Input should be an object",
               "model_type": "Input should be an object", "model_attributes_type": "Input should be an object"}

# Union members and validators that pydantic names in an error's location; not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "json-or-python"}


def _field_path(loc: Sequence[Any]) -> str:
    """("body", "messages", 0, "content", "str") -> "messages[0].content"."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in str(part) or "-" in str(part) or str(part).lower() in _TYPE_TAGS:
            break  # pydantic's tag for which member of a union failed
        else:
            path += f".{part}" if path else str(part)
    return path


def invalid_body(errors: Sequence[Any]) -> GatewayError:
    """The 400 for a request body that failed validation, naming its first invalid field."""
    message, param = validation_message(errors)
    unsupported = bool(errors) and errors[0].get("type") == "not_supported"
    return invalid_request(message, param=param, code="unsupported_parameter" if unsupported else None)


def response_for(exc: Exception) -> JSONResponse:
    """The error response for anything an endpoint raised."""
    if isinstance(exc, GatewayError):
        return exc.response()
    if isinstance(exc, RequestValidationError):
        return invalid_body(exc.errors()).response()
    return GatewayError.of(failure(exc)).response()


def install_handlers(app) -> None:
    async def _respond(_: Request, exc: Exception) -> JSONResponse:
        return response_for(exc)

    for kind in (GatewayError, RequestValidationError, Exception):
        app.add_exception_handler(kind, _respond)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return GatewayError(exc.status_code, message, kind).response()


def json_object(raw: bytes, what: str = "a JSON object") -> dict:
    """A raw body read as a JSON object; a 400 saying what it should have been."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid_request("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise invalid_request(f"the request body must be {what}")
    return payload
