"""The gateway's /openapi.json: the request bodies the routes read raw, and the served program's own
fields for /predict once it has loaded."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from mlflow_dspy.gateway.feedback_service import FeedbackRequest
from mlflow_dspy.gateway.protocol import ChatCompletionRequest, ErrorResponse, PredictShape
from mlflow_dspy.gateway.responses import ResponsesRequest
from mlflow_dspy.runtime.host import ProgramHost

# Every route may answer these, always with an OpenAI error object (documented for clients and fuzzers).
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request (the message names the field)", 401: "missing or invalid API key",
    404: "unknown route or model", 408: "the request body arrived too slowly", 413: "request body too large",
    415: "not a JSON body", 429: "too many requests in flight, or the LM provider is rate limiting",
    502: "the LM failed or answered something unusable", 503: "the model is not loaded (yet)",
    504: "the LM did not answer in time"}.items()}

# The chat routes read their bodies themselves (one strict parse of the raw JSON); this documents them.
CHAT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}
# /predict's body depends on the program: any JSON object until it is loaded, then its input fields.
PREDICT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "the program's input fields, by name"}}}}}
PREDICT_ROUTES = ("/predict", "/predict/stream")
FEEDBACK_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}}}
RESPONSES_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ResponsesRequest"}}}}}
STREAMED = {200: {"content": {"text/event-stream": {}}}}


def document_openapi(app: FastAPI, default_host: Callable[[], ProgramHost | None],
                     shape: Callable[[ProgramHost], PredictShape]) -> None:
    """Add ChatCompletionRequest and ResponsesRequest (and the models they use) to the OpenAPI components
    the routes refer to, and, once the program is loaded, its own input and output fields to /predict.

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
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, ResponsesRequest, FeedbackRequest):
                request = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(request.pop("$defs", {}))
                components[model.__name__] = request
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
