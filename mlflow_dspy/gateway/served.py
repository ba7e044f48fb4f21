"""The programs a gateway serves: the router over them, loading them at start-up (in the background,
so /health answers at once), following the registry's aliases, and tracing."""

from __future__ import annotations

import asyncio
import gc
import logging

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.errors import GatewayError
from mlflow_dspy.gateway.metrics import GatewayMetrics
from mlflow_dspy.gateway.router import Router, Split
from mlflow_dspy.gateway.trace_export import TraceExporter
from mlflow_dspy.packaging.load import host_for_model, version_of
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.trace_record import TraceRecord

log = logging.getLogger("mlflow_dspy.gateway")


def make_router(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> Router:
    """The router over what the config serves (nothing loaded yet)."""
    splits = tuple(Split.parse(text) for text in config.splits)

    def reloaded(name: str, ok: bool) -> None:
        if metrics is not None:
            (metrics.reloads if ok else metrics.reload_failures).labels(name).inc()

    router = Router(host_for_model, lambda parsed: version_of(parsed.uri), smoke_test, splits, reloaded,
                    explain=said_of_failed_load)
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


def start_trace_export(config: GatewayConfig, metrics: GatewayMetrics) -> TraceExporter | None:
    """The trace writer for the tracking store's `mlflow-dspy` experiment; None (tracing off, with a
    warning) when traces are off or the store does not answer: traces are not worth refusing to serve for."""
    if not config.traces:
        return None
    import mlflow

    from mlflow_dspy.packaging.log import EXPERIMENT_NAME, use_tracking_store

    try:
        uri = use_tracking_store()
        experiment_id = mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
    except Exception as exc:
        log.warning("tracing is off: the tracking store failed (%s)", type(exc).__name__)
        return None
    exporter = TraceExporter(uri, experiment_id, metrics, config.trace_queue, config.trace_flush_timeout)
    exporter.start()
    return exporter


class HostSlot:
    """The served programs, once loaded: start-up loads them in the background so /health answers at once."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.loaded = False
        self.failure: str | None = None

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
            raise unknown_model(model or "", self.router.names()) from None
        if info is not None:  # for the response header, the metrics, the trace's tags and the log line
            info.update(model=name, version=host.version, fingerprint=host.fingerprint, variant=variant)
        return host

    def labels(self) -> tuple[str, str]:
        """The metrics' labels for a request that never reached a program: the default one's."""
        host = self.host
        return (host.name, host.version) if host is not None else ("", "")

    def load_in_background(self, config: GatewayConfig, done: asyncio.Future | None = None) -> None:
        """Load the served programs on the router's loader thread; `done` is set (from that thread) when over.

        The loader thread, not the event loop: loading takes seconds and /health
        must answer meanwhile (and reloads later load on the same thread, as DSPy
        requires).
        """
        loop = done.get_loop() if done is not None else None
        router = self.router

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
                self.failure = next(iter(router.failures().values()), None)
            except Exception as exc:
                self.failure = said_of_failed_load(exc)  # said to clients without details; the log has them
                log.error("model failed to load: %s", type(exc).__name__, exc_info=exc)
            finally:
                self.loaded = True
                if done is not None:
                    loop.call_soon_threadsafe(done.set_result, None)

        router.loader.submit(load)


async def follow_aliases(router: Router, interval: float) -> None:
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


# A client's own session id or user is kept in a trace's tags up to this length.
MAX_SESSION_CHARACTERS = 256


def trace_record(info: dict, route: str, session: str | None) -> TraceRecord:
    """A request's trace, to be recorded, tagged with the name it asked for, the version that answered,
    the split's variant, the route, its session (or user) and its request id.

    Searchable, e.g. `mlflow.search_traces(filter_string="tags.`mlflow_dspy.variant` = 'challenger'")`;
    the session is also MLflow's own (`mlflow.trace.session`), which the UI groups by.
    """
    tags = {"mlflow_dspy.model": info["model"], "mlflow_dspy.version": info["fingerprint"],
            "mlflow_dspy.route": route, "mlflow_dspy.request_id": info["request_id"]}
    if info.get("variant"):
        tags["mlflow_dspy.variant"] = info["variant"]
    if session:
        session = tags["mlflow_dspy.session"] = session[:MAX_SESSION_CHARACTERS]
    return TraceRecord(tags=tags, session=session)


def said_of_failed_load(exc: Exception) -> str:
    """What a client may be told of a model that failed to load: nothing, unless its files were tampered with."""
    from mlflow_dspy.packaging.integrity import IntegrityError

    return "its files do not match the SHA-256 recorded when it was logged" if isinstance(exc, IntegrityError) else ""


def unknown_model(name: str, served: list[str]) -> GatewayError:
    """The 404 for a model this gateway does not serve, naming the ones it does."""
    shown = name.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate is shown, not raised
    listed = ", ".join(f"'{n}'" for n in served)
    return GatewayError(404, f"model '{shown}' is not served here; GET /v1/models lists {listed}",
                        "not_found_error", param="model", code="model_not_found")
