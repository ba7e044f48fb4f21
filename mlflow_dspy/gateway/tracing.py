"""Tracing, per request: whether a request is traced (`--trace-sample`), its trace's tags, and, once its
answer has left, its trace handed to the writer process (trace_writer.py)."""

from __future__ import annotations

import logging
import random

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.metrics import GatewayMetrics
from mlflow_dspy.gateway.trace_writer import TraceExporter
from mlflow_dspy.runtime.trace_record import TraceRecord

log = logging.getLogger("mlflow_dspy.gateway")

# A client's own session id or user is kept in a trace's tags up to this length.
MAX_SESSION_CHARACTERS = 256


class Tracing:
    """The gateway's traces: off until `start` finds the tracking store (and never with --no-traces)."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.exporter: TraceExporter | None = None

    @property
    def on(self) -> bool:
        return self.exporter is not None

    def start(self) -> None:
        """Start the trace writer for the tracking store's `mlflow-dspy` experiment. Tracing stays off (with a
        warning) when the store does not answer: traces are not worth refusing to serve for. Blocking."""
        if not self.config.traces:
            return
        import mlflow

        from mlflow_dspy.packaging.log import EXPERIMENT_NAME, use_tracking_store

        try:
            uri = use_tracking_store()
            experiment_id = mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
        except Exception as exc:
            log.warning("tracing is off: the tracking store failed (%s)", type(exc).__name__)
            return
        exporter = TraceExporter(uri, experiment_id, self.metrics, self.config.trace_queue,
                                 self.config.trace_flush_timeout)
        exporter.start()
        self.exporter = exporter

    def begin(self, ctx: RequestContext, sticky: str | None) -> None:
        """A request that reached its program: traced (its TraceRecord in the context), or sampled out."""
        if self.exporter is None:
            return
        sample = self.config.trace_sample
        if sample >= 1 or random.random() < sample:
            ctx.trace = trace_record(ctx, sticky)
        else:
            self.exporter.sampled_out()

    def finished(self, ctx: RequestContext) -> None:
        """After the answer has left (and any program thread it left has ended): its trace goes to the writer."""
        if self.exporter is not None and ctx.trace is not None:
            self.exporter.submit(ctx.trace)

    def refresh_metrics(self) -> None:
        if self.exporter is not None:
            self.exporter.refresh_metrics()

    def close(self) -> None:
        """Give the queued traces --trace-flush-timeout seconds (blocking)."""
        if self.exporter is not None:
            self.exporter.close()


def trace_record(ctx: RequestContext, session: str | None) -> TraceRecord:
    """A request's trace, to be recorded, tagged with the name it asked for, the version that answered,
    the split's variant, the route, its session (or user) and its request id.

    Searchable, e.g. `mlflow.search_traces(filter_string="tags.`mlflow_dspy.variant` = 'challenger'")`;
    the session is also MLflow's own (`mlflow.trace.session`), which the UI groups by.
    """
    tags = {"mlflow_dspy.model": ctx.model, "mlflow_dspy.version": ctx.fingerprint,
            "mlflow_dspy.route": ctx.path, "mlflow_dspy.request_id": ctx.request_id}
    if ctx.variant:
        tags["mlflow_dspy.variant"] = ctx.variant
    if session:
        session = tags["mlflow_dspy.session"] = session[:MAX_SESSION_CHARACTERS]
    return TraceRecord(tags=tags, session=session)
