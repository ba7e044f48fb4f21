"""The gateway: an OpenAI-compatible FastAPI app around one DSPy chat program.

Routes: /v1/chat/completions (and streaming), /v1/responses (the Responses
API, in gateway/responses.py), /v1/models, /invocations (what
`mlflow models serve` answers), the typed /predict and /predict/stream (the
program's own input and output fields, documented in /openapi.json once the
program is loaded), /health and /ready.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from mlflow_dspy.gateway import executor
from mlflow_dspy.gateway.errors import (
    GatewayError,
    from_program_failure,
    install_handlers,
    invalid_body,
    invalid_request,
    parse_body,
)
from mlflow_dspy.gateway.metrics import GatewayMetrics, worker_exited
from mlflow_dspy.gateway.middleware import GatewayMiddleware, Limits
from mlflow_dspy.gateway.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ErrorResponse,
    FinishReason,
    ModelCard,
    ModelList,
    PredictResponse,
    PredictShape,
    Question,
    adapter_prompt,
    completion_id,
    partial_outputs,
)
from mlflow_dspy.gateway.protocol import Delta as DeltaBody
from mlflow_dspy.gateway.protocol import Usage as UsageBody
from mlflow_dspy.gateway.responses import ChatPath, ResponseObject, ResponsesRequest, ResponsesService, parse_request
from mlflow_dspy.gateway.router import Router, Split
from mlflow_dspy.lm_engine.deadline import within
from mlflow_dspy.lm_engine.http1 import close_pool
from mlflow_dspy.packaging.load import host_for_model, version_of
from mlflow_dspy.program.chat import ChatInputError, parse_conversation
from mlflow_dspy.runtime.host import Delta, ProgramHost, Usage

log = logging.getLogger("mlflow_dspy.gateway")
CONFIG_ENV = "MLFLOW_DSPY_GATEWAY_CONFIG"


@dataclass
class GatewayConfig:
    model_uri: str | None = None  # one model; `model_uris` for several
    model_uris: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()  # NAME=ALIAS:WEIGHT,ALIAS:WEIGHT (gateway/router.py)
    reload_interval: float = 30.0  # seconds between looks at the registry's aliases; 0: never
    program: str | None = None
    lm: str | None = None
    served_name: str | None = None
    max_in_flight: int = 64
    max_body_bytes: int = 1 << 20
    max_messages: int = 200
    max_characters: int = 50_000
    request_timeout: float = 120.0
    traces: bool = True
    cors_origins: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    # Several workers share one listening socket: each must load before it accepts, or a client
    # that saw /ready from one worker gets 503 from the next. One worker loads in the background
    # instead, so /health answers at once.
    load_before_serving: bool = False

    def to_env(self) -> str:
        # Keys are not passed this way: workers read GATEWAY_API_KEYS themselves.
        return json.dumps({k: v for k, v in asdict(self).items() if k != "api_keys"})

    @classmethod
    def from_env(cls) -> GatewayConfig:
        config = cls(**json.loads(os.environ.get(CONFIG_ENV, "{}")))
        config.model_uris, config.splits = tuple(config.model_uris), tuple(config.splits)
        config.api_keys = api_keys_from_env()
        return config

    def uris(self) -> list[str]:
        return list(self.model_uris) or ([self.model_uri] if self.model_uri else [])


def api_keys_from_env() -> tuple[str, ...]:
    return tuple(k.strip() for k in os.environ.get("GATEWAY_API_KEYS", "").split(",") if k.strip())


def make_router(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> Router:
    """The router over what the config serves (nothing loaded yet)."""
    splits = tuple(Split.parse(text) for text in config.splits)

    def reloaded(name: str, ok: bool) -> None:
        if metrics is not None:
            (metrics.reloads if ok else metrics.reload_failures).labels(name).inc()

    router = Router(host_for_model, lambda parsed: version_of(parsed.uri), smoke_test, splits, reloaded,
                    explain=_said_of_failed_load)
    router.add_models(config.uris())
    return router


def load_models(config: GatewayConfig, router: Router) -> None:
    """Load what the config serves into the router: on its loader thread, at start-up."""
    if config.program:
        host = ProgramHost.from_program(config.program, config.lm, config.served_name)
        router.add_host(host)
    elif not router.entries:
        raise ValueError("the gateway needs a model URI or a program name")
    router.load_all(config.served_name)
    for host in router.loaded():
        host.warm_up()
    if config.traces:
        enable_tracing()


def enable_tracing() -> None:
    """One MLflow trace per request (the program's spans, LM calls and token usage),
    written to the tracking store's `mlflow-dspy` experiment."""
    import mlflow

    from mlflow_dspy.packaging.log import use_tracking_store

    try:
        use_tracking_store()
        # Runs in the loader thread, the one that configured DSPy: autolog
        # installs its callback with dspy.settings.configure.
        mlflow.dspy.autolog(log_traces=True, log_traces_from_compile=False, log_traces_from_eval=False,
                            silent=True)
    except Exception as exc:
        # Traces are worth having, not worth refusing to serve for.
        log.warning("tracing is off: the tracking store failed (%s)", type(exc).__name__)


# Every route may answer these, always with an OpenAI error object (documented for clients and fuzzers).
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request (the message names the field)", 401: "missing or invalid API key",
    404: "unknown route or model", 408: "the request body arrived too slowly", 413: "request body too large",
    415: "not a JSON body", 429: "too many requests in flight, or the LM provider is rate limiting",
    502: "the LM failed or answered something unusable", 503: "the model is not loaded (yet)",
    504: "the LM did not answer in time"}.items()}


class HostSlot:
    """The served programs, once loaded: start-up loads them in the background so /health answers at once."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.loaded = False
        self.failure: str | None = None
        self._shape: tuple[ProgramHost, PredictShape] | None = None

    @property
    def host(self) -> ProgramHost | None:
        """The default program (the first served): /invocations and /predict answer with it."""
        hosts = self.router.loaded() if self.loaded else []
        return hosts[0] if hosts else None

    def get(self, model: str | None = None, sticky: str | None = None, info: dict | None = None) -> ProgramHost:
        """The program a request's `model` names (the default one without a name); 503 while loading."""
        if not self.loaded or not self.router.loaded():
            if self.failure is None and not self.loaded:
                message = "the model is still loading"
            else:
                message = "the model failed to load" + (f": {self.failure}" if self.failure else "")
            raise GatewayError(503, message, "service_unavailable", code="model_not_ready",
                               headers={"Retry-After": "1"})
        try:
            host, name, variant = self.router.get(model, sticky)
        except KeyError:
            raise _unknown_model(model or "", self.router.names()) from None
        if info is not None:  # for the response header, the metrics and the log line
            info.update(model=name, version=host.version, fingerprint=host.fingerprint, variant=variant)
        return host

    def labels(self) -> tuple[str, str]:
        """The metrics' labels for a request that never reached a program: the default one's."""
        host = self.host
        return (host.name, host.version) if host is not None else ("", "")

    def shape(self, host: ProgramHost) -> PredictShape:
        """The typed /predict models of the loaded program: built on first use, once per host."""
        cached = self._shape
        if cached is None or cached[0] is not host:
            cached = self._shape = (host, PredictShape(host.program))
        return cached[1]


def create_app(config: GatewayConfig, host: ProgramHost | None = None) -> GatewayMiddleware:
    metrics = GatewayMetrics()
    router = make_router(config, metrics)
    slot = HostSlot(router)
    if host is not None:
        router.add_host(host)
        slot.loaded = True

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        executor.install()  # two thread hops per LM call fewer (see serving/executor.py)
        reloading = None
        if not slot.loaded:
            loop = asyncio.get_running_loop()
            loaded = loop.create_future() if config.load_before_serving else None

            def load() -> None:
                try:
                    load_models(config, router)
                    # Everything loaded so far (mlflow, dspy, pydantic, the program) lives as long as the
                    # process: freezing it keeps the collector from re-walking it. Measured: the full
                    # collections over that heap were pauses that set p99 (434-474 ms -> 309-386 ms at
                    # 64 clients, one worker, 200 ms LM).
                    gc.collect()
                    gc.freeze()
                    for each in router.loaded():
                        log.info("model loaded: %s", each.source)
                    slot.failure = next(iter(router.failures().values()), None)
                except Exception as exc:
                    slot.failure = _said_of_failed_load(exc)  # said to clients without details; the log has them
                    log.error("model failed to load: %s", type(exc).__name__, exc_info=exc)
                finally:
                    slot.loaded = True
                    if loaded is not None:
                        loop.call_soon_threadsafe(loaded.set_result, None)

            # The router's loader thread, not the event loop: loading takes seconds and /health must
            # answer meanwhile (and reloads later load on the same thread, as DSPy requires).
            router.loader.submit(load)
            if loaded is not None:
                await loaded  # uvicorn accepts connections only after the lifespan's start-up
        if config.reload_interval > 0 and any(entry.follows_alias for entry in router.entries):
            reloading = asyncio.create_task(_follow_aliases(router, config.reload_interval))
        yield
        if reloading is not None:
            reloading.cancel()
        await close_pool()  # the LM connection pool of this worker's loop
        worker_exited(os.getpid())  # its live gauges leave /metrics with it

    app = FastAPI(title="mlflow-dspy gateway", version="1", lifespan=lifespan, responses=ERROR_RESPONSES)
    install_handlers(app)
    app.state.slot = slot

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Counters in the Prometheus text format (every worker's, with several)."""
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        current = slot.get()
        answer = {"status": "ready", "model": current.name, "models": router.names()}
        if router.failures():  # a version that failed to load or answer; the one before it still serves
            answer["failures"] = router.failures()
        return answer

    @app.get("/v1/models")
    async def models() -> ModelList:
        slot.get()
        return ModelList(data=[ModelCard(id=name, created=slot.get(name).created) for name in router.names()])

    # `:path`: a served name may hold a slash (models:/NAME/VERSION is served as NAME/VERSION).
    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> ModelCard:
        return ModelCard(id=model_id, created=slot.get(model_id).created)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=CHAT_REQUEST_BODY,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(request: Request) -> Response:
        body = _chat_request(await request.body())
        info = request.scope["mlflow_dspy"]
        current = slot.get(body.model, body.user or request.headers.get("x-session-id"), info)
        messages, settings = body.message_dicts(), body.lm_settings()
        _validate(messages, config)
        # A DSPy program calling with its adapter's prompt gets its fields answered in its adapter's format.
        prompt = adapter_prompt(body.messages)
        if prompt is not None:
            prompt.check(current.program)
            messages, json_fields = prompt.conversation(current.program), None
        else:
            json_fields = body.json_answer(current.program)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream and prompt is None:
            stream = _chat_stream(current, messages, settings, include_usage, config.request_timeout,
                                  request.scope["mlflow_dspy"], json_fields)
            return EventSourceResponse(stream, sep="\n", ping=15)
        prediction, finish = await _answer(current, messages, settings, config.request_timeout)
        usage = _record_usage(request, prediction)
        reasoning = current.reasoning(prediction)
        if prompt is not None:
            # The reasoning travels in the adapter's own format (a `reasoning` field), if the client asks for it.
            content, reasoning = prompt.reply(prompt.values(current.program, prediction, current.content(prediction),
                                                            reasoning)), None
        else:
            content = _content(current, prediction, json_fields)
        completion = ChatCompletion(
            model=current.name, system_fingerprint=current.fingerprint,
            choices=[Choice(message=AssistantMessage(content=content, reasoning_content=reasoning),
                            finish_reason=finish)],
            usage=UsageBody(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens),
        )
        if body.stream:  # a DSPy client streaming: its adapter parses the whole answer, sent as one chunk
            return EventSourceResponse(_whole_stream(completion, include_usage), sep="\n", ping=15)
        # Serialized by pydantic directly: FastAPI's generic encoder costs more than the rest of the reply.
        return Response(completion.model_dump_json(), media_type="application/json")

    # The Responses API: the same conversation, program, limits and errors as chat completions (gateway/responses.py).
    responses_service = ResponsesService(ChatPath(
        answer=_answer, finish_reason=_finish_reason, cut_short=_cut_short,
        validate=lambda messages: _validate(messages, config), timeout=config.request_timeout))

    @app.post("/v1/responses", response_model=ResponseObject, openapi_extra=RESPONSES_REQUEST_BODY,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def responses(request: Request) -> Response:
        body = parse_request(await request.body())
        current = slot.get(body.model, body.user or request.headers.get("x-session-id"),
                           request.scope["mlflow_dspy"])
        return await responses_service.create(current, body, request.scope["mlflow_dspy"])

    # Documented with the chat request's schema (the other MLflow input shapes are accepted too).
    @app.post("/invocations", response_model=ChatCompletion, openapi_extra=CHAT_REQUEST_BODY)
    async def invocations(request: Request) -> Response:
        current = slot.get(None, request.headers.get("x-session-id"), request.scope["mlflow_dspy"])
        try:
            messages, settings = _invocation_messages(await request.body(), current.name)
            _validate(messages, config)
            prediction = await _run(current.answer(messages, settings), config.request_timeout, settings)
        except GatewayError as error:
            return _mlflow_style(error)
        except Exception as exc:
            return _mlflow_style(from_program_failure(exc))
        _record_usage(request, prediction)
        # Byte for byte what the DSPy flavor's chat wrapper returns through `mlflow models serve`.
        message = {"role": "assistant", "content": json.dumps(prediction.toDict())}
        payload = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        return Response(json.dumps(payload), media_type="application/json")

    # The body is read raw and validated against the program's own input fields (PredictShape);
    # /openapi.json documents them once the program is loaded (_document_openapi).
    @app.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_REQUEST_BODY)
    async def predict(request: Request) -> Response:
        current = slot.get(None, request.headers.get("x-session-id"), request.scope["mlflow_dspy"])
        inputs = _predict_inputs(await request.body(), slot.shape(current), config)
        prediction = await _run(current.predict(inputs), config.request_timeout)
        _record_usage(request, prediction)
        body = PredictResponse(data=jsonable_encoder(prediction.toDict()))
        return Response(body.model_dump_json(), media_type="application/json")

    @app.post("/predict/stream", openapi_extra=PREDICT_REQUEST_BODY,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def predict_stream(request: Request) -> EventSourceResponse:
        current = slot.get(None, request.headers.get("x-session-id"), request.scope["mlflow_dspy"])
        inputs = _predict_inputs(await request.body(), slot.shape(current), config)
        return EventSourceResponse(
            _predict_stream(current, inputs, config.request_timeout, request.scope["mlflow_dspy"]),
            sep="\n", ping=15,
        )

    _document_openapi(app, slot)
    # The hot routes are served by the middleware itself (see serving/middleware.py); with CORS on,
    # everything goes through FastAPI, whose CORS layer must see every request.
    direct = {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/invocations"): invocations}
    if config.cors_origins:
        # Off by default: a browser page elsewhere may call the gateway only when its origin is listed.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
        direct = {}
    return GatewayMiddleware(app, Limits(
        max_in_flight=config.max_in_flight, max_body_bytes=config.max_body_bytes, api_keys=config.api_keys,
    ), direct=direct, metrics=metrics, labels=slot.labels)


# The chat routes read their bodies themselves (one strict parse of the raw JSON); this documents them.
CHAT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}
# /predict's body depends on the program: any JSON object until it is loaded, then its input fields.
PREDICT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "the program's input fields, by name"}}}}}
PREDICT_ROUTES = ("/predict", "/predict/stream")
RESPONSES_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ResponsesRequest"}}}}}


def _document_openapi(app: FastAPI, slot: HostSlot) -> None:
    """Add ChatCompletionRequest and ResponsesRequest (and the models they use) to the OpenAPI components
    the routes refer to, and, once the program is loaded, its own input and output fields to /predict.

    The program loads after the app is built: a schema made before that is not kept, so the
    first request after the load documents the served program.
    """
    build = app.openapi
    documented: list[ProgramHost | None] = [None]

    def openapi() -> dict:
        host = slot.host
        if app.openapi_schema is None or documented[0] is not host:
            app.openapi_schema = None
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, ResponsesRequest):
                request = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(request.pop("$defs", {}))
                components[model.__name__] = request
            if host is not None:
                _document_predict(schema, slot.shape(host))
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


def _chat_request(raw: bytes) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, raw)


def app_from_env():
    """Factory for uvicorn workers: the configuration arrives through the environment."""
    _configure_logging()
    return create_app(GatewayConfig.from_env())


def _configure_logging() -> None:
    """The gateway's own lines on stderr; other libraries stay at their defaults (warnings)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("mlflow_dspy.gateway", "mlflow_dspy.gateway.access"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(handler)


# -- helpers --------------------------------------------------------------------
async def _run(coro, timeout: float, lm_settings: dict | None = None) -> dspy.Prediction:
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except GatewayError:
        raise
    except Exception as exc:
        raise from_program_failure(exc, lm_settings) from None


def _said_of_failed_load(exc: Exception) -> str:
    """What a client may be told of a model that failed to load: nothing, unless its files were tampered with."""
    from mlflow_dspy.packaging.integrity import IntegrityError

    return "its files do not match the SHA-256 recorded when it was logged" if isinstance(exc, IntegrityError) else ""


async def _follow_aliases(router: Router, interval: float) -> None:
    """Every `interval` seconds, follow the aliases that moved (the loads run on the router's loader thread)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(router.loader, router.check_aliases)
        except Exception as exc:  # never stop following: the next look may succeed
            log.warning("looking at the registry's aliases failed: %s", type(exc).__name__)


def smoke_test(host: ProgramHost) -> None:
    """A freshly loaded version answers its own logged input example before it takes requests."""
    with host.context():
        host.program(messages=host.example)


def _unknown_model(name: str, served: list[str]) -> GatewayError:
    """The 404 for a model this gateway does not serve, naming the ones it does."""
    shown = name.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate is shown, not raised
    listed = ", ".join(f"'{n}'" for n in served)
    return GatewayError(404, f"model '{shown}' is not served here; GET /v1/models lists {listed}",
                        "not_found_error", param="model", code="model_not_found")


async def _answer(host: ProgramHost, messages: list[dict], lm_settings: dict, timeout: float
                  ) -> tuple[dspy.Prediction, FinishReason]:
    """The program's prediction and OpenAI's finish_reason for it.

    An answer cut short by the client's own limit is what OpenAI gives then: a
    200 with what was written, finish_reason "length" (max_tokens) or "stop"
    (a stop sequence). Its outputs are what the LM's text holds of them.
    """
    try:
        async with asyncio.timeout(timeout):
            prediction = await host.answer(messages, lm_settings)
    except GatewayError:
        raise
    except Exception as exc:
        finish = _cut_short(exc, lm_settings)
        if finish is None:
            raise from_program_failure(exc, lm_settings) from None
        return dspy.Prediction(**partial_outputs(exc.lm_response, list(exc.signature.output_fields))), finish
    return prediction, _finish_reason(host, prediction, lm_settings)


def _cut_short(exc: BaseException, lm_settings: dict) -> FinishReason | None:
    """When the client limited the answer (max_tokens, stop) and the program's outputs then failed to
    parse, the limit cut them short: the finish_reason that says so. None for any other failure."""
    if not isinstance(exc, AdapterParseError):
        return None
    if "max_tokens" in lm_settings:
        return "length"
    return "stop" if "stop" in lm_settings else None


def _finish_reason(host: ProgramHost, prediction: dspy.Prediction | None, lm_settings: dict) -> FinishReason:
    """"length" when a one-call program's LM wrote all the tokens the client allowed (its answer parsed
    all the same), else "stop"."""
    limit = lm_settings.get("max_tokens")
    if limit is None or prediction is None or len(host.program.program.predictors()) != 1:
        return "stop"
    return "length" if Usage.of(prediction).completion_tokens >= limit else "stop"


def _content(host: ProgramHost, prediction: dspy.Prediction, json_fields: tuple[str, ...] | None) -> str:
    """The chat answer; with a JSON response_format, the JSON object of the fields it asks for."""
    if json_fields is None:
        return host.content(prediction)
    return json.dumps(jsonable_encoder({name: prediction.get(name) for name in json_fields}))


def _deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def _mlflow_schema(messages: list) -> None:
    """What `mlflow models serve` enforces from the chat signature before the model runs."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise invalid_request(f"messages[{i}] needs string 'role' and 'content' (the model's input schema)",
                                  param="messages")


def _validate(messages: list[dict], config: GatewayConfig) -> None:
    if len(messages) > config.max_messages:
        raise invalid_request(f"{len(messages)} messages; the limit is {config.max_messages}", param="messages",
                              code="too_many_messages")
    characters = sum(_characters(m.get("content")) for m in messages if isinstance(m, dict))
    if characters > config.max_characters:
        raise invalid_request(f"the messages hold {characters} characters; the limit is {config.max_characters}",
                              param="messages", code="too_many_characters")
    try:
        parse_conversation(messages)
    except ChatInputError as exc:
        raise from_program_failure(exc) from None


def _predict_inputs(raw: bytes, shape: PredictShape, config: GatewayConfig) -> dict[str, Any]:
    """The program's keyword arguments from a /predict body, typed; a 400 names the field that is wrong.

    The body is the program's input fields by name. A program with one text input
    also takes the tutorial's `{"text": ...}` (unless it has an input named `text`).
    """
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid_request("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise invalid_request("the request body must be a JSON object of the program's input fields")
    if shape.text_field and "text" in payload and shape.text_field not in payload:
        try:
            question = Question.model_validate(payload)
        except ValidationError as exc:
            raise invalid_body(exc.errors()) from None
        _validate([{"role": "user", "content": question.text}], config)
        return shape.arguments(shape.inputs.model_validate({shape.text_field: question.text}))
    characters = sum(_check_strings(value, name) for name, value in payload.items())
    if characters > config.max_characters:
        raise invalid_request(f"the inputs hold {characters} characters; the limit is {config.max_characters}",
                              code="too_many_characters")
    history = payload.get(shape.history_field) if shape.history_field else None
    turns = history.get("messages") if isinstance(history, dict) else history
    if isinstance(turns, list) and len(turns) > config.max_messages:
        raise invalid_request(f"'{shape.history_field}' holds {len(turns)} messages; the limit is "
                              f"{config.max_messages}", param=shape.history_field, code="too_many_messages")
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


def _characters(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # parts: count their text
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _invocation_messages(raw: bytes, served_name: str) -> tuple[list[dict], dict[str, Any]]:
    """The conversation, and its LM settings, in any input format `mlflow models serve` takes for a chat model.

    The chat format ({"messages": ..., "temperature": ...}) is checked field by
    field like /v1/chat/completions. Like the DSPy flavor, a DataFrame-shaped
    input answers its first row only.
    """
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid_request("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise invalid_request("the request body must be a JSON object")
    if "messages" in payload:
        if isinstance(payload["messages"], list) and all(isinstance(m, dict) for m in payload["messages"]):
            _mlflow_schema(payload["messages"])  # MLflow's own message first, as `mlflow models serve` words it
            try:
                chat = ChatCompletionRequest.model_validate(payload)
            except ValidationError as exc:
                raise invalid_body(exc.errors()) from None
            if chat.model and chat.model != served_name:
                raise invalid_request(f"model '{chat.model}' is not served here", param="model",
                                      code="model_not_found")
            return payload["messages"], chat.lm_settings()
        messages = payload["messages"]
    elif isinstance(payload.get("dataframe_records"), list) and payload["dataframe_records"]:
        messages = _row_messages(payload["dataframe_records"][0])
    elif isinstance(payload.get("dataframe_split"), dict):
        split = payload["dataframe_split"]
        columns, data = split.get("columns"), split.get("data")
        if not (isinstance(columns, list) and "messages" in columns and isinstance(data, list) and data
                and isinstance(data[0], list) and len(data[0]) == len(columns)):
            raise invalid_request("dataframe_split needs a 'messages' column and a row", param="dataframe_split")
        messages = data[0][columns.index("messages")]
    elif "inputs" in payload or "instances" in payload:
        rows = payload.get("inputs", payload.get("instances"))
        messages = _row_messages(rows[0] if isinstance(rows, list) and rows else rows)
    else:
        raise invalid_request("send {\"messages\": [...]} (or dataframe_records, dataframe_split, inputs, instances)",
                              param="messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages must be a non-empty list", param="messages")
    _mlflow_schema(messages)
    return messages, {}


def _row_messages(row: Any) -> Any:
    if not isinstance(row, dict) or "messages" not in row:
        raise invalid_request("each row needs a 'messages' field", param="messages")
    return row["messages"]


def _mlflow_style(error: GatewayError) -> JSONResponse:
    """/invocations errors carry MLflow's keys (error_code, message) and the OpenAI error object."""
    body = error.body()
    code = "BAD_REQUEST" if error.status < 500 else "INTERNAL_ERROR"
    return JSONResponse({"error_code": code, "message": error.message, **body}, status_code=error.status,
                        headers=error.headers)


def _record_usage(request: Request, prediction: dspy.Prediction) -> Usage:
    usage = Usage.of(prediction)
    request.scope["mlflow_dspy"]["usage"] = (usage.prompt_tokens, usage.completion_tokens)
    return usage


def _sse(data: Any) -> dict:
    return {"data": data if isinstance(data, str) else json.dumps(data)}


async def _chat_stream(
    host: ProgramHost, messages: list[dict], lm_settings: dict, include_usage: bool, timeout: float, info: dict,
    json_fields: tuple[str, ...] | None = None,
) -> AsyncIterator[dict]:
    cid, created = completion_id(), int(time.time())

    def chunk(delta: DeltaBody, finish: str | None = None) -> dict:
        body = ChatCompletionChunk(id=cid, created=created, model=host.name, system_fingerprint=host.fingerprint,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump()
        body.pop("usage")
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # only what this chunk carries
        return _sse(body)

    def piece(label: str, text: str) -> dict:
        info.setdefault("first_token", time.perf_counter())
        sent[label] += text
        return chunk(DeltaBody(content=text) if label == "content" else DeltaBody(reasoning_content=text))

    yield chunk(DeltaBody(role="assistant", content=""))
    prediction, sent = None, {"content": "", "reasoning": ""}
    try:
        async for item in within(host.stream(messages, lm_settings), _deadline(timeout)):
            if isinstance(item, Delta):
                if item.field != "content" or json_fields is None:  # a JSON answer is whole only at the end
                    yield piece(item.field, item.text)
            else:
                prediction = item
        finish = _finish_reason(host, prediction, lm_settings)
    except Exception as exc:
        finish = _cut_short(exc, lm_settings)
        if finish is None:
            # The status line is already sent: the failure travels as an error event.
            yield _sse(from_program_failure(exc, lm_settings).body())
            yield _sse("[DONE]")
            return
        # Cut short by the client's limit: the rest of what the LM wrote, then finish_reason "length".
        partial = dspy.Prediction(**partial_outputs(exc.lm_response, list(exc.signature.output_fields)))
        texts = {"reasoning": host.reasoning(partial) or ""}
        if json_fields is None and host.program.streams_answer:
            texts["content"] = host.content(partial)
        elif not sent["content"]:
            texts["content"] = _content(host, partial, json_fields)
        for label, text in texts.items():
            if text.startswith(sent[label]) and len(text) > len(sent[label]):
                yield piece(label, text[len(sent[label]):])
    if json_fields is not None and prediction is not None:
        yield piece("content", _content(host, prediction, json_fields))
    yield chunk(DeltaBody(), finish=finish)
    usage = Usage.of(prediction)
    info["usage"] = (usage.prompt_tokens, usage.completion_tokens)
    if include_usage:
        body = ChatCompletionChunk(id=cid, created=created, model=host.name, choices=[],
                                   usage=UsageBody(prompt_tokens=usage.prompt_tokens,
                                                   completion_tokens=usage.completion_tokens,
                                                   total_tokens=usage.total_tokens))
        yield _sse(body.model_dump())
    yield _sse("[DONE]")


async def _whole_stream(completion: ChatCompletion, include_usage: bool) -> AsyncIterator[dict]:
    """A finished completion as the chunks of a stream: the role, the content, the finish, the usage."""
    choice = completion.choices[0]
    for delta, finish in ((DeltaBody(role="assistant", content=""), None),
                          (DeltaBody(content=choice.message.content), None), (DeltaBody(), choice.finish_reason)):
        body = ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump()
        body.pop("usage")
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        yield _sse(body)
    if include_usage:
        yield _sse(ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                       choices=[], usage=completion.usage).model_dump())
    yield _sse("[DONE]")


async def _predict_stream(host: ProgramHost, inputs: dict[str, Any], timeout: float, info: dict
                          ) -> AsyncIterator[dict]:
    try:
        async for item in within(host.predict_stream(inputs), _deadline(timeout)):
            if isinstance(item, Delta):
                info.setdefault("first_token", time.perf_counter())
                yield _sse({"chunk": {"field": item.field, "text": item.text}})
            else:
                usage = Usage.of(item)
                info["usage"] = (usage.prompt_tokens, usage.completion_tokens)
                yield _sse({"prediction": jsonable_encoder(item.toDict())})
    except Exception as exc:
        yield _sse(from_program_failure(exc).body())
    yield _sse("[DONE]")
