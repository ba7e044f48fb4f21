"""The gateway's /openapi.json beyond what FastAPI reads from the routes' signatures: the errors every route
may answer, the streams, the bodies read raw (/invocations, /predict), and the served program's own fields
for /predict once it has loaded."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from mlflow_dspy.gateway.errors import ErrorResponse
from mlflow_dspy.gateway.predict.shape import PredictShape
from mlflow_dspy.runtime.host import ProgramHost

# Every route may answer these, always with an OpenAI error object (documented for clients and fuzzers).
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request (the message names the field)", 401: "missing or invalid API key",
    404: "unknown route or model", 408: "the request body arrived too slowly", 413: "request body too large",
    415: "not a JSON body", 429: "too many requests in flight, or the LM provider is rate limiting",
    502: "the LM failed or answered something unusable", 503: "the model is not loaded (yet)",
    504: "the LM did not answer in time"}.items()}
STREAMED = {200: {"content": {"text/event-stream": {}}}}
# /invocations takes the chat request (and the other input shapes `mlflow models serve` takes).
INVOCATIONS_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}
# /predict's body depends on the program: any JSON object until it is loaded, then its input fields.
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "the program's input fields, by name"}}}}}
PREDICT_ROUTES = ("/predict", "/predict/stream")


def document_predict(app: FastAPI, default_host: Callable[[], ProgramHost | None],
                     shape: Callable[[ProgramHost], PredictShape]) -> None:
    """Once the program is loaded, its own input and output fields in /predict's documentation.

    The program loads after the app is built: a schema made before that is not kept, so the
    first request after the load documents the served program.
    """
    build = app.openapi
    documented: list[ProgramHost | None] = [None]

    def openapi() -> dict:
        host = default_host()
        if app.openapi_schema is None or documented[0] is not host:
            app.openapi_schema = None
            schema = build()
            if host is not None:
                _document_predict(schema, shape(host))
            documented[0] = host
        return app.openapi_schema

    app.openapi = openapi


def _document_predict(schema: dict, shape: PredictShape) -> None:
    components = schema["components"]["schemas"]
    body, result, models = shape.openapi(set(components))
    components.update(models)
    for path in PREDICT_ROUTES:
        operation = schema["paths"][path]["post"]
        operation["requestBody"]["content"]["application/json"]["schema"] = body
    schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] = result
