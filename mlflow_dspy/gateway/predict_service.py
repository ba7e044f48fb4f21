"""The typed `/predict` and `/predict/stream`: the program's own input fields in, its outputs out.

The body is read raw and validated against the program's input fields
(`PredictShape`, built once per loaded program); a 400 names the field that is
wrong. A program with one text input also takes the tutorial's `{"text": ...}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.chat_service import ChatService
from mlflow_dspy.gateway.errors import from_program_failure, invalid_body, invalid_request, json_object
from mlflow_dspy.gateway.protocol import PredictResponse, PredictShape, Question
from mlflow_dspy.gateway.running import deadline, record_usage, run_within, sse
from mlflow_dspy.lm_engine.deadline import within
from mlflow_dspy.runtime.host import Delta, ProgramHost


class PredictService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat  # its limits (messages, characters, deadline) hold here too
        self._shape: tuple[ProgramHost, PredictShape] | None = None

    def shape(self, host: ProgramHost) -> PredictShape:
        """The typed models of a loaded program: built on first use, once per host."""
        cached = self._shape
        if cached is None or cached[0] is not host:
            cached = self._shape = (host, PredictShape(host.program))
        return cached[1]

    async def create(self, host: ProgramHost, raw: bytes, info: dict) -> Response:
        inputs = self.inputs(raw, self.shape(host))
        prediction = await run_within(host.predict(inputs, info.get("trace")), self.chat.timeout)
        record_usage(info, prediction)
        body = PredictResponse(data=jsonable_encoder(prediction.toDict()))
        return Response(body.model_dump_json(), media_type="application/json")

    async def stream(self, host: ProgramHost, raw: bytes, info: dict) -> EventSourceResponse:
        inputs = self.inputs(raw, self.shape(host))
        return EventSourceResponse(self._events(host, inputs, info), sep="\n", ping=15)

    async def _events(self, host: ProgramHost, inputs: dict[str, Any], info: dict) -> AsyncIterator[dict]:
        try:
            async for item in within(host.predict_stream(inputs, info.get("trace")), deadline(self.chat.timeout)):
                if isinstance(item, Delta):
                    info.setdefault("first_token", time.perf_counter())
                    yield sse({"chunk": {"field": item.field, "text": item.text}})
                else:
                    record_usage(info, item)
                    yield sse({"prediction": jsonable_encoder(item.toDict())})
        except Exception as exc:
            yield sse(from_program_failure(exc).body())
        yield sse("[DONE]")

    def inputs(self, raw: bytes, shape: PredictShape) -> dict[str, Any]:
        """The program's keyword arguments from a /predict body, typed; a 400 names the field that is wrong."""
        payload = json_object(raw, "a JSON object of the program's input fields")
        if shape.text_field and "text" in payload and shape.text_field not in payload:
            try:
                question = Question.model_validate(payload)
            except ValidationError as exc:
                raise invalid_body(exc.errors()) from None
            self.chat.validate([{"role": "user", "content": question.text}])
            return shape.arguments(shape.inputs.model_validate({shape.text_field: question.text}))
        limit = self.chat.max_characters
        characters = sum(_check_strings(value, name) for name, value in payload.items())
        if characters > limit:
            raise invalid_request(f"the inputs hold {characters} characters; the limit is {limit}",
                                  code="too_many_characters")
        history = payload.get(shape.history_field) if shape.history_field else None
        turns = history.get("messages") if isinstance(history, dict) else history
        if isinstance(turns, list) and len(turns) > self.chat.max_messages:
            raise invalid_request(f"'{shape.history_field}' holds {len(turns)} messages; the limit is "
                                  f"{self.chat.max_messages}", param=shape.history_field, code="too_many_messages")
        try:
            # Strict, as the chat routes: "3" is not an int, "yes" not a bool. JSON's own
            # forms still read (a date as its ISO string, an enum as its value).
            model = shape.inputs.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            raise invalid_body(exc.errors()) from None
        return shape.arguments(model)


def _check_strings(value: Any, where: str) -> int:
    """The characters of every string in an input; a 400 for what JSON allows but pydantic does not read."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_request(f"'{where}' is not valid Unicode text (it holds a lone surrogate)",
                                  param=where) from None
        return len(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid_request(f"'{where}': NaN and Infinity are not JSON numbers", param=where)
    if isinstance(value, list):
        return sum(_check_strings(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, dict):
        return sum(_check_strings(item, f"{where}.{key}") for key, item in value.items())
    return 0
