"""The gateway's app: thin routes over the protocol services, behind one middleware.

Each route reads the raw body, picks the program the request names (served.HostSlot
over the router) and hands both to its protocol's service, which returns a
response or a stream (as vLLM's `OpenAIServingChat`):

- /v1/chat/completions: chat_service.ChatService;
- /v1/responses: responses.ResponsesService (the Responses API);
- /invocations: invocations_service.InvocationsService (what `mlflow models serve` answers);
- /predict and /predict/stream: predict_service.PredictService (the program's own fields);
- /v1/models, /health, /ready and /metrics answer here.

There is one dispatch path: the middleware (middleware.py) serves every route
that runs a program itself, whether CORS is on or off (CORS, when on, wraps it
as its outermost layer); FastAPI serves the rest, and documents them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from mlflow_dspy.gateway.chat_service import ChatService
from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.errors import GatewayError, install_handlers, parse_body
from mlflow_dspy.gateway.feedback_service import FeedbackService
from mlflow_dspy.gateway.invocations_service import InvocationsService
from mlflow_dspy.gateway.metrics import GatewayMetrics, worker_exited
from mlflow_dspy.gateway.middleware import MODEL_ROUTES, GatewayMiddleware
from mlflow_dspy.gateway.openapi_docs import (
    CHAT_REQUEST_BODY,
    ERROR_RESPONSES,
    FEEDBACK_REQUEST_BODY,
    PREDICT_REQUEST_BODY,
    RESPONSES_REQUEST_BODY,
    STREAMED,
    document_openapi,
)
from mlflow_dspy.gateway.predict_service import PredictService
from mlflow_dspy.gateway.protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList, PredictResponse
from mlflow_dspy.gateway.responses import ResponseObject, ResponsesRequest, ResponsesService
from mlflow_dspy.gateway.served import HostSlot, follow_aliases, make_router, start_trace_export, trace_record
from mlflow_dspy.gateway.trace_export import TraceExporter
from mlflow_dspy.internals import SPEEDUPS_ENV, dspy_callbacks, dspy_executor
from mlflow_dspy.lm_engine.llama_engine import embedded_stats
from mlflow_dspy.lm_engine.openai_http import close_connections
from mlflow_dspy.runtime.host import ProgramHost

log = logging.getLogger("mlflow_dspy.gateway")


def create_app(config: GatewayConfig, host: ProgramHost | None = None) -> GatewayMiddleware:
    """The gateway for `config`; with `host`, serving that program at once (tests, embedding)."""
    metrics = GatewayMetrics()
    router = make_router(config, metrics)
    slot = HostSlot(router)
    if host is not None:
        router.add_host(host)
        slot.loaded = True
    exporter: list[TraceExporter | None] = [None]  # started with the app, by its lifespan
    chat = ChatService(config)
    responses_service, invocations_service = ResponsesService(chat), InvocationsService(chat)
    predict_service = PredictService(chat)
    feedback = FeedbackService()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # Two thread hops per LM call fewer, and DSPy's callback handlers (the trace recorder) remembered,
        # unless the speed-ups are off (mlflow_dspy/internals).
        on = dspy_executor.install()
        dspy_callbacks.install()
        log.info("speed-ups on DSPy's and uvicorn's internals: %s", "on" if on else f"off ({SPEEDUPS_ENV}=0)")
        if not slot.loaded:
            loaded = asyncio.get_running_loop().create_future() if config.load_before_serving else None
            slot.load_in_background(config, loaded)
            if loaded is not None:
                await loaded  # uvicorn accepts connections only after the lifespan's start-up
        # On a thread: a tracking store that is slow to answer must not keep /health from answering.
        exporter[0] = await asyncio.to_thread(start_trace_export, config, metrics)
        feedback.tracing = exporter[0] is not None
        counting = asyncio.create_task(_refresh_counts(exporter[0], metrics))
        reloading = None
        if config.reload_interval > 0 and any(entry.follows_alias for entry in router.entries):
            reloading = asyncio.create_task(follow_aliases(router, config.reload_interval))
        yield
        if reloading is not None:
            reloading.cancel()
        counting.cancel()
        if exporter[0] is not None:
            await asyncio.to_thread(exporter[0].close)  # the queued traces, within --trace-flush-timeout
        await close_connections()  # the LM connection pool of this worker's loop
        worker_exited(os.getpid())  # its live gauges leave /metrics with it

    app = FastAPI(title="mlflow-dspy gateway", version="1", lifespan=lifespan, responses=ERROR_RESPONSES)
    install_handlers(app)
    app.state.slot = slot

    def program_for(request: Request, model: str | None = None, user: str | None = None) -> ProgramHost:
        """The program a request names; a sticky `user` or x-session-id keeps a split's variant.
        With traces on (and the request sampled), its trace to record goes in the request's info."""
        sticky = user or request.headers.get("x-session-id")
        info = request.scope["mlflow_dspy"]
        host = slot.get(model, sticky, info)
        if exporter[0] is not None:
            if config.trace_sample >= 1 or random.random() < config.trace_sample:
                info["trace"] = trace_record(info, request.url.path, sticky)
                info["trace_id"] = info["trace"].request_id  # the answer's x-mlflow-trace-id header
            else:
                exporter[0].sampled_out()
        return host

    def finished(info: dict) -> None:
        """After the answer has left: its trace goes to the writer."""
        if exporter[0] is not None and info.get("trace") is not None:
            exporter[0].submit(info["trace"])

    # -- the routes that run a program (served by the middleware) ------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=CHAT_REQUEST_BODY,
              responses=STREAMED)
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await request.body())
        return await chat.create(program_for(request, body.model, body.user), body, request.scope["mlflow_dspy"])

    @app.post("/v1/responses", response_model=ResponseObject, openapi_extra=RESPONSES_REQUEST_BODY,
              responses=STREAMED)
    async def responses(request: Request) -> Response:
        body = parse_body(ResponsesRequest, await request.body())
        return await responses_service.create(program_for(request, body.model, body.user), body,
                                              request.scope["mlflow_dspy"])

    # Documented with the chat request's schema (the other MLflow input shapes are accepted too).
    @app.post("/invocations", response_model=ChatCompletion, openapi_extra=CHAT_REQUEST_BODY)
    async def invocations(request: Request) -> Response:
        return await invocations_service.create(program_for(request), await request.body(),
                                                request.scope["mlflow_dspy"])

    # /openapi.json documents the program's own fields once it is loaded (openapi_docs.py).
    @app.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_REQUEST_BODY)
    async def predict(request: Request) -> Response:
        return await predict_service.create(program_for(request), await request.body(), request.scope["mlflow_dspy"])

    @app.post("/predict/stream", openapi_extra=PREDICT_REQUEST_BODY, responses=STREAMED)
    async def predict_stream(request: Request) -> Response:
        return await predict_service.stream(program_for(request), await request.body(), request.scope["mlflow_dspy"])

    # -- the rest (served by FastAPI) ------------------------------------------------------
    def host_of(tags: dict[str, str]) -> ProgramHost | None:
        """The program a trace's answer came from: the version that answered, else the name asked for."""
        version = tags.get("mlflow_dspy.version")
        for host in router.loaded():
            if host.fingerprint == version:
                return host
        try:
            return slot.get(tags.get("mlflow_dspy.model") or "")
        except GatewayError:
            return None

    @app.post("/v1/feedback", openapi_extra=FEEDBACK_REQUEST_BODY)
    async def give_feedback(request: Request) -> Response:
        """A verdict on an answer (its x-mlflow-trace-id), recorded as MLflow assessments on its trace."""
        return await feedback.create(await request.body(), host_of)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Counters in the Prometheus text format (every worker's, with several)."""
        if exporter[0] is not None:
            exporter[0].refresh_metrics()
        metrics.refresh_embedded(embedded_stats())
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

    document_openapi(app, lambda: slot.host, predict_service.shape)
    direct = {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/responses"): responses,
              ("POST", "/invocations"): invocations, ("POST", "/predict"): predict,
              ("POST", "/predict/stream"): predict_stream}
    assert {path for _, path in direct} == set(MODEL_ROUTES)
    return GatewayMiddleware(app, config.limits(), direct=direct, metrics=metrics, labels=slot.labels,
                             cors_origins=config.cors_origins, finished=finished)


async def _refresh_counts(exporter: TraceExporter | None, metrics: GatewayMetrics, every: float = 5.0) -> None:
    """Bring the trace writer's counts (written, failed) and the embedded model's figures into /metrics
    (and the log), whether or not anyone scrapes: each worker its own."""
    while True:
        await asyncio.sleep(every)
        if exporter is not None:
            exporter.refresh_metrics()
        metrics.refresh_embedded(embedded_stats())


def app_from_env() -> GatewayMiddleware:
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
