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
  `mlflow.chat.tokenUsage` and `mlflow.llm.model`.

tests/test_internals_mlflow_traces.py writes a record through these into a real
store and reads it back with MLflow's public API; it fails, naming what changed,
when they change. This is not a speed-up: it stays on with `MLFLOW_DSPY_SPEEDUPS=0`.
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
            "attributes": {key: json.dumps(value, default=str) for key, value in attributes.items()},
        })
    return spans


def trace_store(tracking_uri: str) -> Callable[[str, Sequence[TraceLike]], None]:
    """A function that writes recorded traces into an experiment of the tracking store, in one call."""
    from mlflow.entities import Span
    from mlflow.tracing.client import TracingClient

    client = TracingClient(tracking_uri)

    def write(experiment_id: str, records: Sequence[TraceLike]) -> None:
        client.log_spans(experiment_id, [Span.from_dict(d) for record in records for d in span_dicts(record)])

    return write


def _b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()
