"""The gateway's traces: which requests are traced (`--trace-sample`) and their tags (`Tracing`), and the
writer process that stores them (`TraceExporter`), so that tracing costs the requests almost nothing.

- **Off the request path.** A request's trace is queued (a bounded queue) when its answer has been
  sent. A separate process writes the queued traces in batches of up to BATCH, one transaction (or one
  request to an HTTP store) a batch: into a SQLite or PostgreSQL store as the rows MLflow's `log_spans` would
  write (internals/mlflow_sql_traces.py: about 0.25 ms of CPU a `qa` trace, against 4.2 ms through
  `log_spans`), otherwise the way MLflow's own exporter writes spans (internals/mlflow_traces.py; an `mlflow
  server` on this project's store plugin, internals/mlflow_store_plugin.py, writes them as rows too). It runs
  at the gateway's own priority, so that it keeps up with a gateway that keeps the CPU busy.
- **Traces are dropped, never requests.** A full queue drops the trace. A store that is down (or fails)
  does not: the writer keeps the batch and tries it again with a backoff, up to RETRY_MAX seconds apart,
  until the store is back (MLflow's cached /version lookup of an HTTP store cleared after each failure),
  while new traces wait in the bounded queue; a batch the store refuses is dropped. Every trace is counted
  in `/metrics` (`mlflow_dspy_traces_total{outcome}`: queued, written, dropped, sampled_out) and drops
  are logged, as the writer's failures and the store's return are.
- **A graceful stop flushes.** At shutdown the writer is given `flush_timeout` seconds to write what
  is queued; what is left then is counted as dropped and logged.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import random
import re
import signal
import time
from typing import Any

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.metrics import GatewayMetrics
from mlflow_dspy.internals.mlflow_traces import DOWN, FAILED, failure_kind, forget_failed_lookups, trace_store
from mlflow_dspy.runtime.trace_record import TraceRecord

log = logging.getLogger("mlflow_dspy.gateway")
BATCH = 500  # traces a write takes at most (one transaction, or one request to an HTTP store)
BATCH_WAIT = 1.0  # seconds a batch waits to fill before it is written (fewer, larger sessions cost less CPU)


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

    def writer_started(self, timeout: float) -> bool:
        """Wait (blocking) until the writer has opened the store, `timeout` seconds at most: a writer still
        starting (importing MLflow, some seconds on a busy machine) has written nothing yet."""
        return self.exporter is not None and self.exporter.ready.wait(timeout)

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


class TraceExporter:
    """Queues recorded traces for the writer process, counting what becomes of each."""

    def __init__(self, tracking_uri: str, experiment_id: str, metrics: GatewayMetrics | None = None,
                 queue_size: int = 2000, flush_timeout: float = 10.0) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads and a loop
        self.queue = context.Queue(maxsize=queue_size)
        self.written, self.failed = context.Value("q", 0), context.Value("q", 0)
        self.ready = context.Event()  # set by the writer once it has opened the store (MLflow imported)
        self.failing = context.Value("d", 0.0)  # since when the store fails (time.time()), 0 while it does not
        self.metrics = metrics
        self.flush_timeout = flush_timeout
        self.queued = self.dropped = self._reported_written = self._reported_failed = 0
        self._last_warning = 0.0
        self.process = context.Process(target=write_traces, name="mlflow-dspy-traces", daemon=True,
                                       args=(self.queue, tracking_uri, experiment_id, self.written, self.failed,
                                             self.failing, self.ready))

    def start(self) -> None:
        self.process.start()

    def submit(self, record: TraceRecord) -> bool:
        """Queue a finished request's trace; False (and counted) when the queue is full."""
        if not record.spans:
            return False  # the program never ran (refused before it started): nothing to trace
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            why = "the trace queue is full (the tracking store is slower than the requests)"
            if since := self.failing.value:
                why = (f"the trace queue is full: the tracking store has been failing for {time.time() - since:.0f} s"
                       " (the writer retries; see its lines in the log)")
            if not self.process.is_alive():
                why = f"the trace writer has stopped (exit code {self.process.exitcode}; see the log above)"
            self._drop(1, why)
            return False
        self.queued += 1
        self._count("queued")
        return True

    def close(self) -> None:
        """Flush: give the writer `flush_timeout` seconds for what is queued, then count what is left."""
        deadline = time.monotonic() + self.flush_timeout
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=self.flush_timeout)  # the writer stops after what is before it
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        # What is still in the pipe is lost (and counted below): the process may exit without feeding it.
        self.queue.cancel_join_thread()
        self.queue.close()
        self.refresh_metrics()  # the writer's failures are dropped traces already
        lost = self.queued - self._reported_written - self._reported_failed
        if lost > 0:
            self._drop(lost, f"{lost} traces were still queued at the stop", always=True)
        log.info("traces: %d queued, %d written, %d dropped", self.queued, self.written.value, self.dropped)

    def sampled_out(self) -> None:
        self._count("sampled_out")

    def _drop(self, count: int, why: str, always: bool = False) -> None:
        self.dropped += count
        self._count("dropped", count)
        now = time.monotonic()
        if always or now - self._last_warning > 10:  # at most one line every 10 s under pressure
            self._last_warning = now
            log.warning("traces dropped (%d so far): %s", self.dropped, why)

    def _count(self, outcome: str, amount: int = 1) -> None:
        if self.metrics is not None and amount:
            self.metrics.traces.labels(outcome).inc(amount)

    def refresh_metrics(self) -> None:
        """Bring the written count (kept by the writer process) into /metrics."""
        written, failed = self.written.value, self.failed.value
        self._count("written", written - self._reported_written)
        self._reported_written = written
        if failed > self._reported_failed:
            new, self._reported_failed = failed - self._reported_failed, failed
            self._drop(new, "the tracking store would not take them (see the writer's lines in the log)")


# -- the writer process ------------------------------------------------------------------------
RETRY_FIRST = 0.5  # seconds before a failed batch is tried again; doubled after each failure ...
RETRY_MAX = 5.0  # ... up to this: traces flow again at most this long after the store is back
RETRY_FAILED = 4  # attempts at a batch the store failed on (not down): then it is dropped
# The writer's own retries replace MLflow's (7 retries with backoff, about 4 minutes of one blocked request);
# a user's own setting of these wins.
WRITER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def write_traces(inbox: Any, tracking_uri: str, experiment_id: str, written: Any, failed: Any,
                 failing: Any = None, ready: Any = None) -> None:
    """The writer process's main: batches from `inbox` to the store until the None that ends them.

    A batch the store fails to take is kept and tried again, with a backoff from RETRY_FIRST to RETRY_MAX
    seconds, for as long as the store is down (while it is, new traces wait in the bounded queue, and those
    past it are dropped and counted by the gateway); a batch the store refuses (or fails on RETRY_FAILED
    times) is dropped and counted. `failing` holds the time the store began failing (0 when it is not)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C stops the gateway, which then flushes us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # At the gateway's own CPU priority, as a batch task (it does not preempt a request's work when it wakes). At
    # the lowest priority (nice 19, as it was) a gateway that kept the CPU busy starved it: 27-41% of traces stored
    # at 340 answers/s, and 83% at nice 10; it costs about 0.2-0.45 ms of CPU a trace, taken while it has traces.
    with contextlib.suppress(AttributeError, OSError):  # Linux only
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    for name, value in WRITER_ENV.items():
        os.environ.setdefault(name, value)
    store = trace_store(tracking_uri)
    if ready is not None:
        ready.set()
    outage = _Outage(failing)
    batch: list[TraceRecord] = []
    done: bool | None = False
    while True:
        if not batch:
            batch, done = _next_batch(inbox)
            if done is None:  # the gateway process is gone without a word: nobody to write for
                return
        if batch:
            try:
                store(experiment_id, batch)
            except Exception as exc:
                if outage.failed(exc, len(batch), failed):
                    if not _wait(outage.delay()):
                        return
                    continue  # the same batch again
            else:
                with written.get_lock():
                    written.value += len(batch)
                outage.over()
            batch = []
        if done:
            return


class _Outage:
    """What the writer knows of the store's failures: since when, how many attempts at the batch it holds."""

    def __init__(self, failing: Any) -> None:
        self.failing = failing
        self.since = 0.0
        self.attempts = 0
        self.last_said = 0.0

    def failed(self, exc: Exception, size: int, failed: Any) -> bool:
        """Count a failed attempt at a batch of `size`; True when the batch is to be tried again."""
        forget_failed_lookups()  # MLflow would otherwise remember the failed /version lookup for good
        kind = failure_kind(exc)
        self.attempts += 1
        now = time.monotonic()
        if not self.since:
            self.since = now
            if self.failing is not None:
                self.failing.value = time.time()
        retry = kind == DOWN or (kind == FAILED and self.attempts < RETRY_FAILED)
        if not retry:
            with failed.get_lock():
                failed.value += size
            self.attempts = 0
        if now - self.last_said > 10 or not retry:  # at most a line every 10 s while it lasts
            self.last_said = now
            message = re.sub(r"://[^/@\s]+@", "://", (str(exc).splitlines() or [""])[0][:200])  # no credentials
            what = f"{type(exc).__name__}: {message}"
            then = (f"retrying the batch of {size} (new traces wait in the queue; past it, they are dropped)"
                    if retry else f"the batch of {size} is dropped ({failed.value} traces dropped so far)")
            print(f"mlflow-dspy traces: the tracking store failed ({what}) for {now - self.since:.0f} s; {then}",
                  flush=True)
        return retry

    def delay(self) -> float:
        return min(RETRY_MAX, RETRY_FIRST * 2 ** (self.attempts - 1)) * random.uniform(0.8, 1.0)

    def over(self) -> None:
        if self.since:
            print(f"mlflow-dspy traces: the tracking store took a batch again after {time.monotonic() - self.since:.0f}"
                  f" s of failures; writing", flush=True)
            if self.failing is not None:
                self.failing.value = 0.0
        self.since, self.attempts = 0.0, 0


def _wait(seconds: float) -> bool:
    """Sleep `seconds`, or less if the gateway process dies meanwhile; False then."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not multiprocessing.parent_process().is_alive():
            return False
        time.sleep(min(left, 0.5))
    return True


def _next_batch(inbox: Any) -> tuple[list[TraceRecord], bool | None]:
    """Up to BATCH records: the first as soon as it comes, the rest within BATCH_WAIT; True at the end
    (the None the gateway sends last), None when the gateway process died without sending it."""
    while True:
        try:
            first = inbox.get(timeout=1.0)
            break
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return [], None
    if first is None:
        return [], True
    batch, until = [first], time.monotonic() + BATCH_WAIT
    while len(batch) < BATCH:
        try:
            item = inbox.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            break
        if item is None:
            return batch, True
        batch.append(item)
    return batch, False
