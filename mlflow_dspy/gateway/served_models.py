"""The programs a gateway serves: the router over them (router.py), loading them at start-up (in the
background, so /health answers at once), following the registry's aliases, and finding the one a request
names (the model's lookup)."""

from __future__ import annotations

import asyncio
import gc
import logging

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.errors import GatewayError
from mlflow_dspy.gateway.metrics import GatewayMetrics
from mlflow_dspy.gateway.openai_wire import shown
from mlflow_dspy.gateway.router import Router, Split
from mlflow_dspy.packaging.integrity import IntegrityError
from mlflow_dspy.packaging.load import host_for_model, version_of
from mlflow_dspy.packaging.signing import trust_keys_from
from mlflow_dspy.packaging.uris import ModelUriProblem, parse_model_uri
from mlflow_dspy.runtime.host import ProgramHost

log = logging.getLogger("mlflow_dspy.gateway")


class ServedModels:
    """The served programs, once loaded: start-up loads them in the background so /health answers at once."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics | None = None,
                 host: ProgramHost | None = None) -> None:
        self.config = config

        def reloaded(name: str, ok: bool) -> None:
            if metrics is not None:
                (metrics.reloads if ok else metrics.reload_failures).labels(name).inc()

        trust = trust_keys_from(config.trust_keys)  # () when none is set: manifests guard against corruption

        def load(uri: str) -> ProgramHost:
            try:
                host = host_for_model(uri, trust=trust)
                log.info("%s verified and loaded from its private copy %s", uri, host.files)
                return host
            except IntegrityError as exc:  # kept out of traffic: counted here, said on /ready by the router
                if metrics is not None:
                    metrics.model_refusals.labels(_model_name(uri), exc.reason).inc()
                raise

        self.router = Router(load, lambda parsed: version_of(parsed.uri), smoke_test,
                             tuple(Split.parse(text) for text in config.splits), reloaded, explain=said_of_failed_load)
        self.router.add_models(config.uris())
        self.loaded = False
        self.failure: str | None = None
        if host is not None:  # served at once (tests, embedding)
            self.router.add_host(host)
            self.loaded = True

    @property
    def default(self) -> ProgramHost | None:
        """The default program (the first served): /invocations and /predict answer with it."""
        hosts = self.router.loaded() if self.loaded else []
        return hosts[0] if hosts else None

    def get(self, model: str | None = None, sticky: str | None = None) -> tuple[ProgramHost, str, str | None]:
        """(program, the name it answers as, the split's variant) for a request's `model` (the default one
        without a name); 503 while loading, 404 for a name not served here."""
        if not self.loaded or not self.router.loaded():
            if self.failure is None and not self.loaded:
                message = "the model is still loading"
            else:
                message = "the model failed to load" + (f": {self.failure}" if self.failure else "")
            raise GatewayError(503, message, "service_unavailable", code="model_not_ready",
                               headers={"Retry-After": "1"})
        try:
            return self.router.get(model, sticky)
        except KeyError:
            raise unknown_model(model or "", self.router.names()) from None

    def host(self, model: str | None = None) -> ProgramHost:
        return self.get(model)[0]

    def of_version(self, fingerprint: str | None, name: str | None) -> ProgramHost | None:
        """The program that gave an answer: the version that answered, else the name asked for (None if
        neither is served now)."""
        for host in self.router.loaded():
            if host.fingerprint == fingerprint:
                return host
        try:
            return self.host(name or "")
        except GatewayError:
            return None

    def labels(self) -> tuple[str, str]:
        """The metrics' labels for a request that never reached a program: the default one's."""
        host = self.default
        return (host.name, host.version) if host is not None else ("", "")

    def ready(self) -> dict:
        """What /ready says once a model serves: the default one, every name, and the failed loads."""
        answer = {"status": "ready", "model": self.host().name, "models": self.router.names()}
        if self.router.failures():  # a version that failed to load or answer; the one before it still serves
            answer["failures"] = self.router.failures()
        return answer

    # -- loading -------------------------------------------------------------------------
    def load(self) -> None:
        """Load what the config serves into the router: on its loader thread, at start-up."""
        config, router = self.config, self.router
        if config.program:
            router.add_host(ProgramHost.from_program(config.program, config.lm, config.served_name))
        elif not router.entries:
            raise ValueError("the gateway needs a model URI or a program name")
        router.load_all(config.served_name)
        for host in router.loaded():
            host.warm_up()

    def load_in_background(self, done: asyncio.Future | None = None) -> None:
        """Load the served programs on the router's loader thread; `done` is set (from that thread) when over.

        The loader thread, not the event loop: loading takes seconds and /health
        must answer meanwhile (and reloads later load on the same thread, as DSPy
        requires).
        """
        loop = done.get_loop() if done is not None else None

        def load() -> None:
            try:
                self.load()
                # Everything loaded so far (mlflow, dspy, pydantic, the program) lives as long as the
                # process: freezing it keeps the collector from re-walking it. Measured: the full
                # collections over that heap were pauses that set p99 (434-474 ms -> 309-386 ms at
                # 64 clients, one worker, 200 ms LM).
                gc.collect()
                gc.freeze()
                for each in self.router.loaded():
                    log.info("model loaded: %s", each.source)
                self.failure = next(iter(self.router.failures().values()), None)
            except Exception as exc:
                self.failure = said_of_failed_load(exc)  # said to clients without details; the log has them
                log.error("model failed to load: %s", type(exc).__name__, exc_info=exc)
            finally:
                self.loaded = True
                if done is not None:
                    loop.call_soon_threadsafe(done.set_result, None)

        self.router.loader.submit(load)

    @property
    def follows_aliases(self) -> bool:
        return self.config.reload_interval > 0 and any(entry.follows_alias for entry in self.router.entries)

    async def follow_aliases(self) -> None:
        """Every reload interval, follow the aliases that moved (the loads run on the router's loader thread)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                await loop.run_in_executor(self.router.loader, self.router.check_aliases)
            except Exception as exc:  # never stop following: the next look may succeed
                log.warning("looking at the registry's aliases failed: %s", type(exc).__name__)


def smoke_test(host: ProgramHost) -> None:
    """A freshly loaded version answers its own logged input example before it takes requests."""
    with host.context():
        host.program(messages=host.example)


def said_of_failed_load(exc: Exception) -> str:
    """What a client may be told of a model that failed to load: nothing, unless it was refused by its integrity
    check (tampered files, or unsigned or wrongly signed under a trust key)."""
    return exc.said if isinstance(exc, IntegrityError) else ""


def _model_name(uri: str) -> str:
    """The registered name a URI names (the metrics' model label), else the URI."""
    try:
        return parse_model_uri(uri).name or uri
    except ModelUriProblem:
        return uri


def unknown_model(name: str, served: list[str]) -> GatewayError:
    """The 404 for a model this gateway does not serve, naming the ones it does."""
    listed = ", ".join(f"'{n}'" for n in served)
    return GatewayError(404, f"model '{shown(name)}' is not served here; GET /v1/models lists {listed}",
                        "not_found_error", param="model", code="model_not_found")
