"""The typed `/predict` and `/predict/stream`: the program's own input fields in, its outputs out.

The body is read raw and validated against the program's input fields
(`PredictShape`, built once per loaded program); a 400 names the field that is
wrong. A program with one text input also takes the tutorial's `{"text": ...}`.
The request's run (runtime/run.py) calls the program itself, not its chat front,
and streams every output field by its own name.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.chat.service import ConversationLimits, sse
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.errors import GatewayError, invalid_body, invalid_request, json_object
from mlflow_dspy.gateway.predict.shape import PredictResponse, PredictShape, Question
from mlflow_dspy.program.chat import Conversation, Message
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Delta, Failed, Run, ToolStep


class PredictService:
    def __init__(self, limits: ConversationLimits) -> None:
        self.limits = limits  # the chat routes' own
        self._shape: tuple[ProgramHost, PredictShape] | None = None

    def shape(self, host: ProgramHost) -> PredictShape:
        """The typed models of a loaded program: built on first use, once per host."""
        cached = self._shape
        if cached is None or cached[0] is not host:
            cached = self._shape = (host, PredictShape(host.program))
        return cached[1]

    async def create(self, ctx: RequestContext, host: ProgramHost, raw: bytes, stream: bool = False) -> Response:
        inputs = self.inputs(raw, self.shape(host))
        run = ctx.start_run(host, inputs, stream=stream)
        if stream:
            return EventSourceResponse(_events(run), sep="\n", ping=15)
        outcome = await run.outcome()
        if isinstance(outcome, Failed):
            raise GatewayError.of(outcome.failure)
        body = PredictResponse(data=jsonable_encoder(outcome.prediction.toDict()))
        return Response(body.model_dump_json(), media_type="application/json")

    def inputs(self, raw: bytes, shape: PredictShape) -> dict[str, Any]:
        """The program's keyword arguments from a /predict body, typed; a 400 names the field that is wrong."""
        payload = json_object(raw, "a JSON object of the program's input fields")
        if shape.text_field and "text" in payload and shape.text_field not in payload:
            _not_blank(payload, "text")
            try:
                question = Question.model_validate(payload)
            except ValidationError as exc:
                raise invalid_body(exc.errors()) from None
            # The tutorial's form is one user message: the chat routes' rules hold.
            conversation = Conversation.of([Message("user", question.text, "messages[0]")])
            self.limits.check_characters(conversation.characters)
            return shape.arguments(shape.inputs.model_validate({shape.text_field: question.text}))
        if shape.question_field:
            _not_blank(payload, shape.question_field)
        characters = sum(_characters(value, name) for name, value in payload.items())
        self.limits.check_characters(characters, "the inputs", param=None)
        history = payload.get(shape.history_field) if shape.history_field else None
        turns = history.get("messages") if isinstance(history, dict) else history
        if isinstance(turns, list):
            self.limits.check_count(len(turns), param=shape.history_field, holder=shape.history_field)
        try:
            # Strict, as the chat routes: "3" is not an int, "yes" not a bool. JSON's own
            # forms still read (a date as its ISO string, an enum as its value).
            model = shape.inputs.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            raise invalid_body(exc.errors()) from None
        return shape.arguments(model)


async def _events(run: Run) -> AsyncIterator[dict]:
    """A run's events as the tutorial's stream: each field's text as it comes, the prediction, [DONE]."""
    async for event in run.events():
        if isinstance(event, Delta):
            yield sse({"chunk": {"field": event.field, "text": event.text}})
        elif isinstance(event, ToolStep):
            yield sse({"tool": {"name": event.name, "arguments": event.arguments, "output": event.output}})
        elif isinstance(event, Failed):
            yield sse(GatewayError.of(event.failure).body())
        else:
            yield sse({"prediction": jsonable_encoder(event.prediction.toDict())})
    yield sse("[DONE]")


def _not_blank(payload: dict[str, Any], name: str) -> None:
    """The rule of every protocol: a question that is empty (or only white space) is a 400, before any LM call."""
    value = payload.get(name)
    if isinstance(value, str) and not value.strip():
        raise invalid_request(f"'{name}' is empty: there is no question to answer", param=name, code="empty_question")


def _characters(value: Any, where: str) -> int:
    """The characters of every string in an input; a 400 for what JSON allows but pydantic does not read."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid_request(f"'{where}': NaN and Infinity are not JSON numbers", param=where)
    if isinstance(value, list):
        return sum(_characters(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, dict):
        return sum(_characters(item, f"{where}.{key}") for key, item in value.items())
    return 0
