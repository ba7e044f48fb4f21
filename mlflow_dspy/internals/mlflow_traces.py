"""Traces written to MLflow's store the way MLflow's own exporter writes them, through parts MLflow does not
promise to keep.

The gateway records a request's trace as plain data (runtime/trace_record.py) and
a writer process stores it (gateway/tracing.py). Storing leans on:

* `mlflow.tracing.client.TracingClient.log_spans(location, spans)`: how MLflow's
  own exporter writes spans to a tracking store; not public API;
* `Span.from_dict`'s format: OpenTelemetry-style dicts with base64 ids and JSON-encoded
  attribute values;
* the attribute keys MLflow reads a trace's meaning from (`SpanAttributeKey`):
  `mlflow.traceRequestId`, `mlflow.spanType`, `mlflow.spanInputs`/`Outputs`,
  `mlflow.traceTag.<key>` on the root span for the trace's tags, `session.id`,
  `mlflow.chat.tokenUsage` and `mlflow.llm.model`;
* an HTTP store's `RestStore._get_server_version`, the `/version` lookup `log_spans` makes first: an
  `functools.lru_cache` that keeps a failed lookup (None) too, so that once a batch was sent while the
  server was down every later `log_spans` raises `NotImplementedError("... could not identify MLflow server
  version")`, the server back or not. `forget_failed_lookups` clears it after a failure (`failure_kind` reads
  that error as the store being down).

tests/test_internals_mlflow_traces.py writes a record through these into a real
store and reads it back with MLflow's public API; it fails, naming what changed,
when they change. This is not a speed-up: it stays on with `MLFLOW_DSPY_SPEEDUPS=0`.
Into a SQLite or PostgreSQL store, `trace_store` writes the rows `log_spans` would write itself
(internals/mlflow_sql_traces.py, a speed-up), and `log_spans` what those do not cover.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mlflow.tracing.constant import SpanAttributeKey

TOKEN_USAGE = SpanAttributeKey.CHAT_USAGE  # on the root span: MLflow adds it up as the trace's usage
LM_MODEL = SpanAttributeKey.MODEL


class SpanLike(Protocol):
    span_id: str  # 16 hex digits
    parent_id: str | None
    name: str
    span_type: str
    start_ns: int
    end_ns: int | None
    inputs: Any
    outputs: Any
    error: str | None
    attributes: dict[str, Any]


class TraceLike(Protocol):
    trace_id: str  # 32 hex digits
    request_id: str  # MLflow's id for the trace
    tags: dict[str, str]
    session: str | None
    spans: Sequence[SpanLike]


def span_dicts(record: TraceLike) -> list[dict]:
    """A recorded trace as MLflow's span dictionaries (what `Span.from_dict` reads): its tags and session on
    the root span, where the store reads them."""
    trace_id = _b64(record.trace_id)
    spans = []
    for span in record.spans:
        attributes = {SpanAttributeKey.REQUEST_ID: record.request_id, SpanAttributeKey.SPAN_TYPE: span.span_type,
                      SpanAttributeKey.INPUTS: span.inputs, SpanAttributeKey.OUTPUTS: span.outputs, **span.attributes}
        if span.parent_id is None:
            prefix = SpanAttributeKey.TRACE_TAG_PREFIX
            attributes.update({f"{prefix}{key}": value for key, value in record.tags.items()})
            if record.session:
                attributes[SpanAttributeKey.SESSION_ID] = record.session
        spans.append({
            "trace_id": trace_id,
            "span_id": _b64(span.span_id),
            "parent_span_id": _b64(span.parent_id) if span.parent_id else None,
            "name": span.name,
            "start_time_unix_nano": span.start_ns,
            "end_time_unix_nano": span.end_ns or span.start_ns,
            "events": [],
            "status": {"code": "STATUS_CODE_ERROR" if span.error else "STATUS_CODE_OK", "message": span.error or ""},
            "attributes": {key: _encode(value) for key, value in attributes.items()},
        })
    return spans


def trace_store(tracking_uri: str) -> Callable[[str, Sequence[TraceLike]], None]:
    """A function that writes recorded traces into an experiment of the tracking store, in one call."""
    from mlflow.entities import Span
    from mlflow.tracing.client import TracingClient

    from mlflow_dspy.internals.mlflow_sql_traces import records_writer

    client = TracingClient(tracking_uri)
    rows = records_writer(client.store, span_dicts)  # a SQL store: its rows, without log_spans's ORM work

    def write(experiment_id: str, records: Sequence[TraceLike]) -> None:
        if rows is not None:
            try:
                if rows(experiment_id, records):
                    return
            except Exception:
                pass  # log_spans then writes the batch (over what exists), or raises what the store says
        client.log_spans(experiment_id, [Span.from_dict(d) for record in records for d in span_dicts(record)])

    return write


def forget_failed_lookups() -> bool:
    """Make the next write to an HTTP store ask the server's version again (MLflow caches a failed lookup for
    the life of the process). Call it after a failed write; False when MLflow no longer has that cache."""
    from mlflow.store.tracking.rest_store import RestStore

    clear = getattr(getattr(RestStore, "_get_server_version", None), "cache_clear", None)
    if clear is None:
        return False
    clear()
    return True


# What a failed write says about the store: `down` (unreachable, timing out, or saying to come back later:
# retry the batch until it is back), `failed` (an error of its own on this batch: retry a few times), or
# `refused` (it will not take this batch: do not retry).
DOWN, FAILED, REFUSED = "down", "failed", "refused"
_COME_BACK_LATER = {429, 502, 503, 504}


def failure_kind(exc: BaseException) -> str:
    """`DOWN`, `FAILED` or `REFUSED`, for an exception a write through `trace_store` raised."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, NotImplementedError):  # RestStore.log_spans: the /version lookup failed (or is too old)
        return DOWN if "could not identify" in str(exc) else REFUSED
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        message = str(exc)
        # http_request wraps a connection failure or a timeout in an MlflowException (INTERNAL_ERROR, 500).
        if status in _COME_BACK_LATER or "failed with exception" in message or "timeout" in message.lower():
            return DOWN
        return FAILED if status >= 500 else REFUSED
    if isinstance(exc, (OSError, TimeoutError)):
        return DOWN
    return FAILED


_encode = json.JSONEncoder(default=str).encode  # json.dumps(value, default=str), without an encoder a call


def _b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()
