"""The gateway: one object that holds what serves (the models, their traces and metrics, the protocols) and
the road every request takes, layer by layer.

    the request ─ Gateway.serve ─ context.RequestContext.begin      (its id, the headers that name the answer)
                   ├─ admission.check_headers                      (Host, the key, JSON, the declared length)
                   ├─ admission.read_body                          (a deadline, a size, valid text)
                   ├─ admission.InFlight.take                      (the cap on programs running at once)
                   └─ Gateway.dispatch ─ the route                 (a client that leaves cancels it)
                        └─ Gateway.program_for                     (the model's lookup, the trace)
                             └─ chat/, responses/, predict/, invocations/: a parsed request and the program in,
                                a response out, from the one run of runtime/run.py
                        (or, at /mcp, mcp.McpTools.serve: MCP's tool calls, each run as /predict runs it)
    then Gateway.finished: the slot back, the trace to its writer, the metrics, one log line.

A graceful stop (`Gateway.stop_gracefully`, called by the HTTP protocol when uvicorn begins its own): every
request in flight gets --graceful-timeout to end; a run still going then ends as a failure that says so
(runtime/run.py's STOPPING), which each protocol sends as it sends any failure: a JSON error, or in a stream its
error event and its end. /ready says 503 from then on.

The routes are FastAPI's, typed (their bodies documented in /openapi.json from the
models themselves). With the speed-ups on (the default), the five that run a program
are served straight from their endpoint functions (`Gateway._direct`): the body
parsed by the same pydantic model, without FastAPI's middleware stack, routing and
dependency solving, which cost about 0.23 ms of CPU a request here (README,
Benchmark). The answers are the same either way (tests/test_gateway_app.py sends one
corpus both ways); `--no-speedups` routes them through FastAPI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import AppStatus
from starlette.middleware.cors import CORSMiddleware

from mlflow_dspy.gateway import admission, openapi
from mlflow_dspy.gateway.admission import PROGRAM_ROUTES, InFlight
from mlflow_dspy.gateway.chat.service import ChatService, ConversationLimits
from mlflow_dspy.gateway.chat.wire import ChatCompletion, ChatCompletionRequest
from mlflow_dspy.gateway.config import OPEN_ROUTES, GatewayConfig
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.errors import GatewayError, install_handlers, invalid_body, invalid_request, response_for
from mlflow_dspy.gateway.feedback import FEEDBACK_BODY, FEEDBACK_RESPONSES, FeedbackRequest, FeedbackService
from mlflow_dspy.gateway.invocations.service import InvocationsService
from mlflow_dspy.gateway.mcp import MCP_HEADERS, MCP_PATH, McpTools
from mlflow_dspy.gateway.metrics import GatewayMetrics, worker_exited
from mlflow_dspy.gateway.openai_wire import ModelCard, ModelList
from mlflow_dspy.gateway.predict.service import PredictService
from mlflow_dspy.gateway.predict.shape import PredictResponse
from mlflow_dspy.gateway.responses.service import ResponsesService
from mlflow_dspy.gateway.responses.wire import ResponseObject, ResponsesRequest
from mlflow_dspy.gateway.served_models import ServedModels
from mlflow_dspy.gateway.tracing import Tracing
from mlflow_dspy.internals import SPEEDUPS_ENV, dspy_callbacks, dspy_executor, speedups_enabled
from mlflow_dspy.internals.uvicorn_protocol import GRACEFUL_STOP
from mlflow_dspy.lm_engine.llama_engine import embedded_stats
from mlflow_dspy.lm_engine.openai_http import close_connections
from mlflow_dspy.program.work import tracking_thread_work
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import STOPPING

log = logging.getLogger("mlflow_dspy.gateway")
access_log = logging.getLogger("mlflow_dspy.gateway.access")
# Routes the metrics name; any other path is counted as "other" (a scanner must not grow the label set).
KNOWN_ROUTES = (*admission.BODY_ROUTES, "/v1/models", MCP_PATH)

Endpoint = Callable[..., Awaitable[Response]]


async def context(request: Request) -> RequestContext:
    """The request's context (a FastAPI dependency)."""
    return RequestContext.of(request)


async def raw_body(request: Request) -> bytes:
    """The request's body as it came (a FastAPI dependency, for routes that read it themselves)."""
    return await request.body()


Context = Annotated[RequestContext, Depends(context)]
RawBody = Annotated[bytes, Depends(raw_body)]


class Gateway:
    """The gateway for one configuration: an ASGI app."""

    def __init__(self, config: GatewayConfig, host: ProgramHost | None = None) -> None:
        self.config = config
        self.limits = config.limits()
        self.metrics = GatewayMetrics()
        self.models = ServedModels(config, self.metrics, host)
        self.tracing = Tracing(config, self.metrics)
        self.in_flight = InFlight(self.limits, self.metrics)
        conversation_limits = ConversationLimits(config.max_messages, config.max_characters)
        self.chat = ChatService(conversation_limits)
        self.responses = ResponsesService(conversation_limits)
        self.predict = PredictService(conversation_limits)
        self.invocations = InvocationsService(conversation_limits)
        self.feedback = FeedbackService(config)
        self.mcp = McpTools(self)  # the programs as MCP tools, at /mcp (and over stdio: `mlflow-dspy mcp`)
        self.running: set[RequestContext] = set()  # the requests in flight
        self.stop_at: float | None = None  # once a graceful stop has begun: the loop time its runs must end by
        self.app = FastAPI(title="mlflow-dspy gateway", version="1", lifespan=self.lifespan,
                           responses=openapi.ERROR_RESPONSES)
        install_handlers(self.app)
        self.app.state.gateway = self
        # (method, path) -> (endpoint, its body's model or None for the raw body): served by `dispatch`.
        self.direct: dict[tuple[str, str], tuple[Endpoint, type[BaseModel] | None]] = {}
        self._routes()
        openapi.document_predict(self.app, lambda: self.models.default, self.predict.shape)
        self._entry = self.serve
        if config.cors_origins:
            # Off by default: a browser page elsewhere may call the gateway only when its origin is listed. The
            # outermost layer, so it sees every request (its errors too); the road below is the same either way.
            self._entry = CORSMiddleware(self.serve, allow_origins=list(config.cors_origins),
                                         allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type", "X-Session-Id",
                                                        "X-Mlflow-Feedback-Token", *MCP_HEADERS],
                                         expose_headers=["X-Request-Id", "X-Mlflow-Trace-Id",
                                                         "X-Mlflow-Feedback-Token", "X-Mlflow-Dspy-Model-Version"])

    async def __call__(self, scope, receive, send) -> None:
        await self._entry(scope, receive, send)

    # -- the road ------------------------------------------------------------------------
    async def serve(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # the lifespan
            return
        ctx = RequestContext.begin(scope, self.config.request_timeout)
        send = ctx.stamped(send)
        self.running.add(ctx)
        if self.stop_at is not None:
            ctx.stop_by(self.stop_at)
        try:
            ctx.caller = admission.check_headers(scope, ctx.headers, self.limits)
            ctx.tokens = self.feedback.tokens
            # The body first, under a deadline: a slow upload must not sit on a slot meant for running programs.
            body = await admission.read_body(scope, receive, self.limits)
            if ctx.path in PROGRAM_ROUTES:
                self.in_flight.take()
                ctx.holds_slot = True
            with tracking_thread_work() as ctx.threads:
                await self.dispatch(ctx, scope, body, receive, send)
            # One turn of the loop, so the response's coalesced write (internals/uvicorn_protocol.py) leaves before
            # the bookkeeping below: the client does not wait for it.
            await asyncio.sleep(0)
        except GatewayError as error:
            await error.response()(scope, receive, send)
        except asyncio.CancelledError:
            if self.stop_at is None or ctx.responded:
                raise
            # uvicorn's own limit, past --graceful-timeout, cancelled a request no run held (a run ends at
            # --graceful-timeout itself): a JSON error rather than uvicorn's plain-text 500.
            await GatewayError.of(STOPPING).response()(scope, receive, send)
        finally:
            self.running.discard(ctx)
            self.finished(ctx)

    def stop_gracefully(self) -> None:
        """The server's graceful stop has begun (on the event loop): every request in flight, and its run, must
        end within --graceful-timeout from now. Said again, it changes nothing."""
        if self.stop_at is not None:
            return
        self.stop_at = asyncio.get_running_loop().time() + self.config.graceful_timeout
        log.info("stopping: %d requests in flight get %g s to finish", len(self.running), self.config.graceful_timeout)
        for ctx in list(self.running):
            ctx.stop_by(self.stop_at)

    async def dispatch(self, ctx: RequestContext, scope, body: bytes, receive, send) -> None:
        """Run the route in this task; if the client goes away first, cancel it, and with it the LM call."""
        gone = asyncio.Event()
        task = asyncio.current_task()
        state = {"finished": False, "left": False}

        async def send_tracked(message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True  # after this the server reports "disconnect" to everyone

        async def watch() -> None:
            # The body is already read: the next message from the client can only be its disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not state["finished"]:
                state["left"] = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            route = self.direct.get((ctx.method, ctx.path))
            if ctx.path == MCP_PATH:
                await self.mcp.serve(ctx, scope, _replay(body, gone), send_tracked)
            elif route is None:
                await self.app(scope, _replay(body, gone), send_tracked)
            else:
                await self._direct(ctx, route, body, scope, _replay(body, gone), send_tracked)
        except asyncio.CancelledError:
            if not state["left"]:
                raise  # cancelled from elsewhere (server shutdown): not ours to swallow
        finally:
            watcher.cancel()
        if state["left"]:  # whether the route stopped at the cancellation or ended anyway
            task.uncancel()
            ctx.status = 499  # client closed request (nginx's convention), for the log line

    @staticmethod
    async def _direct(ctx: RequestContext, route: tuple[Endpoint, type[BaseModel] | None], body: bytes,
                      scope, receive, send) -> None:
        """A program route served from its endpoint: the body parsed as FastAPI would, errors answered as its
        handlers would."""
        endpoint, model = route
        try:
            response = await endpoint(parse_body(model, body) if model is not None else body, ctx)
        except Exception as exc:
            response = response_for(exc)
        await response(scope, receive, send)

    def program_for(self, ctx: RequestContext, model: str | None = None, user: str | None = None) -> ProgramHost:
        """The program a request names (a sticky `user` or x-session-id keeps a split's variant), and whether
        its run is traced."""
        sticky = user or ctx.session
        host, name, variant = self.models.get(model, sticky)
        ctx.served_by(host, name, variant)
        self.tracing.begin(ctx, sticky)
        return host

    def finished(self, ctx: RequestContext) -> None:
        """Once the answer has left: the slot back and the trace to its writer (when every program thread the
        request left has ended: abandoned work cannot pile up beyond the cap), the metrics, the log line."""
        def done() -> None:
            if ctx.holds_slot:
                self.in_flight.release()
            self.tracing.finished(ctx)

        running = [future for future in ctx.threads if not future.done()]
        if running:
            admission.when_done(running, done)
        else:
            done()
        seconds = time.perf_counter() - ctx.started
        if ctx.path not in OPEN_ROUTES:
            model, version = (ctx.model, ctx.version) if ctx.model is not None else self.models.labels()
            self.metrics.observe(model, version, ctx.path if ctx.path in KNOWN_ROUTES else "other", ctx.status,
                                 seconds, ctx.first_text, ctx.usage)
        prompt, completion = ctx.usage or (0, 0)
        access_log.info(json.dumps({"request_id": ctx.request_id, "method": ctx.method, "route": ctx.path,
                                    "status": ctx.status, "latency_ms": round(seconds * 1000, 2),
                                    "prompt_tokens": prompt, "completion_tokens": completion}))

    # -- the routes ----------------------------------------------------------------------
    def _program_route(self, path: str, endpoint: Endpoint, body: type[BaseModel] | None, **documented: Any) -> None:
        """A route that runs a program: FastAPI's (documented from its signature), served directly (`_direct`)
        unless the speed-ups are off."""
        self.app.add_api_route(path, endpoint, methods=["POST"], **documented)
        if speedups_enabled():
            self.direct[("POST", path)] = (endpoint, body)

    def _routes(self) -> None:
        app = self.app

        async def chat_completions(body: ChatCompletionRequest, ctx: Context) -> Response:
            return await self.chat.create(ctx, self.program_for(ctx, body.model, body.user), body)

        async def responses(body: ResponsesRequest, ctx: Context) -> Response:
            return await self.responses.create(ctx, self.program_for(ctx, body.model, body.user), body)

        async def invocations(raw: RawBody, ctx: Context) -> Response:
            return await self.invocations.create(ctx, self.program_for(ctx), raw)

        async def predict(raw: RawBody, ctx: Context) -> Response:
            return await self.predict.create(ctx, self.program_for(ctx), raw)

        async def predict_stream(raw: RawBody, ctx: Context) -> Response:
            return await self.predict.create(ctx, self.program_for(ctx), raw, stream=True)

        self._program_route("/v1/chat/completions", chat_completions, ChatCompletionRequest,
                            response_model=ChatCompletion, responses=openapi.STREAMED)
        self._program_route("/v1/responses", responses, ResponsesRequest, response_model=ResponseObject,
                            responses=openapi.STREAMED)
        # Documented with the chat request's schema (the other MLflow input shapes are accepted too).
        self._program_route("/invocations", invocations, None, response_model=ChatCompletion,
                            openapi_extra=openapi.INVOCATIONS_BODY)
        # /openapi.json documents the program's own fields once it is loaded (openapi.py).
        self._program_route("/predict", predict, None, response_model=PredictResponse,
                            openapi_extra=openapi.PREDICT_BODY)
        self._program_route("/predict/stream", predict_stream, None, openapi_extra=openapi.PREDICT_BODY,
                            responses=openapi.STREAMED)

        @app.post("/v1/feedback", openapi_extra=FEEDBACK_BODY, responses=FEEDBACK_RESPONSES)
        async def give_feedback(raw: RawBody, ctx: Context) -> Response:
            """A verdict on an answer (its x-mlflow-trace-id), from the caller that got it (its
            x-mlflow-feedback-token, sent back as that header), recorded as MLflow assessments on its trace."""
            self.feedback.admit(ctx.caller)  # the caller's rate, before its body is read
            return await self.feedback.create(ctx, parse_body(FeedbackRequest, raw), self.models.of_version)

        @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
        async def prometheus_metrics() -> Response:
            """Counters in the Prometheus text format (every worker's, with several)."""
            self.tracing.refresh_metrics()
            self.metrics.refresh_embedded(embedded_stats())
            content, media_type = self.metrics.exposition()
            return Response(content, media_type=media_type)

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> dict:
            if self.stop_at is not None:
                raise GatewayError(503, "the server is stopping", "service_unavailable", code="server_shutting_down",
                                   headers={"Retry-After": "1"})
            return self.models.ready()

        @app.get("/v1/models")
        async def models() -> ModelList:
            self.models.get()
            return ModelList(data=[ModelCard(id=name, created=self.models.host(name).created)
                                   for name in self.models.router.names()])

        # `:path`: a served name may hold a slash (models:/NAME/VERSION is served as NAME/VERSION).
        @app.get("/v1/models/{model_id:path}")
        async def model_card(model_id: str) -> ModelCard:
            if not model_id:  # GET /v1/models/: no id is not the default model's
                raise GatewayError(404, "not found", "not_found_error")
            return ModelCard(id=model_id, created=self.models.host(model_id).created)

    # -- start and stop ------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, _: FastAPI):
        # Two thread hops per LM call fewer, and DSPy's callback handlers (the trace recorder) remembered,
        # unless the speed-ups are off (mlflow_dspy/internals).
        on = dspy_executor.install()
        dspy_callbacks.install()
        # sse-starlette ends every stream the moment uvicorn is told to stop, mid-answer and without a word;
        # the gateway ends its streams itself (stop_gracefully).
        AppStatus.disable_automatic_graceful_drain()
        log.info("speed-ups on DSPy's and uvicorn's internals: %s", "on" if on else f"off ({SPEEDUPS_ENV}=0)")
        if not self.models.loaded:
            loaded = asyncio.get_running_loop().create_future() if self.config.load_before_serving else None
            self.models.load_in_background(loaded)
            if loaded is not None:
                await loaded  # uvicorn accepts connections only after the lifespan's start-up
        # On a thread: a tracking store that is slow to answer must not keep /health from answering.
        await asyncio.to_thread(self.tracing.start)
        await asyncio.to_thread(self.feedback.start, self.tracing.on)
        self.feedback.writer_started = self.tracing.writer_started
        counting = asyncio.create_task(self._refresh_counts())
        following = asyncio.create_task(self.models.follow_aliases()) if self.models.follows_aliases else None
        async with self.mcp.running():
            # The HTTP protocol finds in the server's lifespan state what to call when uvicorn begins to stop.
            yield {GRACEFUL_STOP: self.stop_gracefully}
        if following is not None:
            following.cancel()
        counting.cancel()
        await asyncio.to_thread(self.tracing.close)  # the queued traces, within --trace-flush-timeout
        self.feedback.close()
        await close_connections()  # the LM connections of this worker's loop
        worker_exited(os.getpid())  # its live gauges leave /metrics with it

    async def _refresh_counts(self, every: float = 5.0) -> None:
        """Bring the trace writer's counts (written, failed) and the embedded model's figures into /metrics
        (and the log), whether or not anyone scrapes: each worker its own."""
        while True:
            await asyncio.sleep(every)
            self.tracing.refresh_metrics()
            self.metrics.refresh_embedded(embedded_stats())


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], raw: bytes) -> Body:
    """One strict parse of a raw JSON body; on failure, the errors Python's JSON reader leads to.

    pydantic's JSON parser refuses a few inputs Python's `json` reads (NaN, a lone
    surrogate escape) as invalid JSON; re-reading them with `json` names the field
    or the text that is wrong, as the rest of the gateway does.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            raise invalid_request("the request body is not valid JSON") from None
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            errors = exc.errors()
    raise invalid_body(errors)


def create_app(config: GatewayConfig, host: ProgramHost | None = None) -> Gateway:
    """The gateway for `config`; with `host`, serving that program at once (tests, embedding)."""
    return Gateway(config, host)


def app_from_env() -> Gateway:
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


def _replay(body: bytes, gone: asyncio.Event):
    """A `receive` that hands the route the body already read, then reports the client's disconnect when the
    watcher sees it (a streaming response waits for it)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return replay
