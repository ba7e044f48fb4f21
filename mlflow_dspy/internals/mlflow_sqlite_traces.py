"""Recorded traces written straight into a SQLite tracking store's tables, one transaction and three
multi-row inserts a batch, as the very rows MLflow's own `log_spans` writes for a new trace.

Why: `SqlAlchemyStore.log_spans` costs about 4 ms of CPU a trace (measured on the gateway's `qa` traces, in
batches of 100): it rebuilds each span as an OpenTelemetry object, then, per trace, flushes the new trace on its
own, merges each tag (a SELECT and an INSERT), and updates the trace row it has just written; at a gateway's
sustained rate (400-500 answers/s here) that is more CPU than two cores have. The rows themselves are cheap.

What it leans on (none of it public API; tests/test_internals_mlflow_traces.py writes the same records both
ways into two stores and compares every row of every table, so that a change of MLflow's fails there, naming
the table and the column):

* the tables `trace_info`, `spans` and `trace_tags` (MLflow's models `SqlTraceInfo`, `SqlSpan`, `SqlTraceTag`)
  and what `log_spans` puts in them for a trace it creates: the trace's time range, status, previews
  (`_get_truncated_preview`), session and token usage columns, `db_payload_generation` 1; each span's row with
  its content (`Span.to_dict()`'s JSON with `links`, attribute values as `sanitize_attributes` leaves them);
  the tags `mlflow.artifactLocation` (`_get_trace_artifact_location_tag`), `mlflow.trace.spansLocation` and the
  root span's `mlflow.traceTag.*` (`_validate_trace_tag`);
* the store's `ManagedSessionMaker` (its SQLite pragmas, the commit or rollback).

Only for what it matches: a SQLite store, MLflow's trace rollups off, and records of the gateway's own shape
(token usage on the root only, no cost or trace name, no input named `model`, from which MLflow would infer the
LM). Anything else, or any failure of this path (a trace id already stored, say), goes through `log_spans`.
It is a speed-up: `MLFLOW_DSPY_SPEEDUPS=0` turns it off.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

from mlflow.tracing.constant import SpanAttributeKey

from mlflow_dspy.internals import speedups_enabled

TOKEN_KEYS = ("input_tokens", "output_tokens", "total_tokens")
_MARKER = "mlflowdspytraceid0123456789abcdef"  # a trace id that no URI quoting changes
_OWN_ATTRIBUTES = {SpanAttributeKey.CHAT_USAGE, SpanAttributeKey.MODEL}


def sqlite_writer(store: Any, span_dicts: Callable[[Any], list[dict]]) -> Callable[[str, Sequence[Any]], bool] | None:
    """A function writing a batch of recorded traces into `store` (True), or declining the batch (False) for
    `log_spans` to write; None when `store` is not a SQLite store this path knows (or the speed-ups are off)."""
    if not speedups_enabled():
        return None
    try:
        from mlflow.store.tracking.dbmodels.models import SqlSpan, SqlTraceInfo, SqlTraceTag
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.store.tracking.utils.sql_trace_rollups import rollups_enabled
        from mlflow.store.tracking.utils.trace_analytics import (
            bounded_model_dimension,
            token_count_or_none,
            validate_session_id,
        )
        from mlflow.tracing.utils.truncation import _get_truncated_preview
        from mlflow.utils.mlflow_tags import MLFLOW_ARTIFACT_LOCATION
        from mlflow.utils.validation import _validate_trace_tag
        from sqlalchemy import bindparam, insert
    except ImportError:
        return None
    if not isinstance(store, SqlAlchemyStore) or getattr(store, "db_type", None) != "sqlite" or rollups_enabled():
        return None
    from mlflow.tracing.constant import SpansLocation, TraceTagKey

    spans_location = (TraceTagKey.SPANS_LOCATION, SpansLocation.TRACKING_STORE.value)
    tag_prefix = SpanAttributeKey.TRACE_TAG_PREFIX
    locations: dict[str, tuple[str, str] | Any] = {}

    def artifact_location(experiment_id: str, trace_id: str) -> str:
        """MLflow's own tag value for the trace, worked out once an experiment: for a marker trace id, then the
        marker replaced (or, if the marker does not come back as it went, asked again for each trace)."""
        if experiment_id not in locations:
            experiment = store.get_experiment(experiment_id)
            value = store._get_trace_artifact_location_tag(experiment, _MARKER).value
            locations[experiment_id] = tuple(value.split(_MARKER)) if value.count(_MARKER) == 1 else experiment
        known = locations[experiment_id]
        if isinstance(known, tuple):
            return f"{known[0]}{trace_id}{known[1]}"
        return store._get_trace_artifact_location_tag(known, trace_id).value

    @functools.lru_cache(maxsize=4096)  # a model, version, route, variant: the same few values again and again
    def trace_tag(key: str, value: str) -> tuple[str, str] | None:
        """The tag log_spans makes of a root span's `mlflow.traceTag.<key>` attribute, or None (left out)."""
        try:
            return _validate_trace_tag(key, str(_parsed_string(value)))
        except Exception:
            return None

    def preview(value: str | None, role: str) -> str | None:
        if not value:
            return None
        try:
            return _get_truncated_preview(value, role=role)
        except Exception:
            return None  # as log_spans: a preview that fails is left out

    def rows(experiment_id: str, record: Any) -> tuple[dict, list[dict], list[dict]] | None:
        """The trace's rows, or None when it is not of the shape this path writes."""
        spans = record.spans
        if not spans or spans[0].parent_id is not None or record.tags.get(TraceTagKey.TRACE_NAME) is not None:
            return None
        trace_id = record.request_id
        dicts = span_dicts(record)
        span_rows = []
        for span, d in zip(spans, dicts, strict=True):
            if not _own_shape(span):
                return None
            attributes = d["attributes"]
            for key, value in attributes.items():
                attributes[key] = _sanitized(value)
            d["links"] = []
            model = attributes.get(SpanAttributeKey.MODEL)
            span_rows.append({
                "trace_id": trace_id, "experiment_id": experiment_id, "span_id": span.span_id,
                "parent_span_id": span.parent_id, "name": span.name, "type": span.span_type,
                "status": "ERROR" if span.error else "OK", "start_time_unix_nano": d["start_time_unix_nano"],
                "end_time_unix_nano": d["end_time_unix_nano"],
                "content": json.dumps(d, ensure_ascii=False),
                "input_cost": None, "output_cost": None, "total_cost": None,
                "model_name": bounded_model_dimension(_parsed_string(model)) if model is not None else None,
                "model_provider": None,
            })
        root, root_attributes = spans[0], dicts[0]["attributes"]
        start_ms = min(row["start_time_unix_nano"] for row in span_rows) // 1_000_000
        end_ms = max(row["end_time_unix_nano"] for row in span_rows) // 1_000_000
        info = {"request_id": trace_id, "experiment_id": experiment_id, "timestamp_ms": start_ms,
                "execution_time_ms": end_ms - start_ms,  # as log_spans leaves it (every span here has an end)
                "status": "ERROR" if root.error else "OK", "client_request_id": None,
                "request_preview": preview(root_attributes.get(SpanAttributeKey.INPUTS), "user"),
                "response_preview": preview(root_attributes.get(SpanAttributeKey.OUTPUTS), "assistant"),
                "db_payload_generation": 1, "trace_name": None, "session_id": None}
        if (session := root_attributes.get(SpanAttributeKey.SESSION_ID)) is not None:
            info["session_id"] = validate_session_id(_parsed_string(session))
        usage = root.attributes.get(SpanAttributeKey.CHAT_USAGE) or {}
        for key in TOKEN_KEYS:
            info[key] = token_count_or_none(usage.get(key))
        tags = {MLFLOW_ARTIFACT_LOCATION: artifact_location(experiment_id, trace_id),
                spans_location[0]: spans_location[1]}
        for key, value in root_attributes.items():
            if key.startswith(tag_prefix) and (tag := trace_tag(key[len(tag_prefix):], value)) is not None:
                tags[tag[0]] = tag[1]
        return info, span_rows, [{"request_id": trace_id, "key": k, "value": v} for k, v in tags.items()]

    def write(experiment_id: str, records: Sequence[Any]) -> bool:
        infos, span_rows, tag_rows = [], [], []
        for record in records:
            built = rows(experiment_id, record)
            if built is None:
                return False
            infos.append(built[0])
            span_rows.extend(built[1])
            tag_rows.extend(built[2])
        with store.ManagedSessionMaker(read_only=False) as session:
            cursor = session.connection().connection.cursor()  # the DBAPI's, in the session's transaction
            try:
                for table, batch in ((SqlTraceInfo.__table__, infos), (SqlSpan.__table__, span_rows),
                                     (SqlTraceTag.__table__, tag_rows)):
                    sql, names = statement(table, session, batch[0])
                    cursor.executemany(sql, [tuple(row[name] for name in names) for row in batch])
            finally:
                cursor.close()
        return True

    statements: dict[tuple, tuple[str, tuple[str, ...]]] = {}

    def statement(table: Any, session: Any, row: dict) -> tuple[str, tuple[str, ...]]:
        """The table's INSERT for the row's columns, compiled once by SQLAlchemy for the store's dialect, and the
        order its parameters take."""
        key = (table.name, tuple(row))
        if key not in statements:
            compiled = insert(table).values({name: bindparam(name) for name in row}).compile(
                dialect=session.get_bind().dialect)
            statements[key] = (str(compiled), tuple(compiled.positiontup))
        return statements[key]

    return write


def _own_shape(span: Any) -> bool:
    """Whether log_spans would store the span as it is: only the recorder's own attributes, token usage on the
    root only and never beside a model (MLflow would price it), and no input named `model` without a model
    attribute (MLflow would take it for the LM's)."""
    own = span.attributes.keys()
    if own - _OWN_ATTRIBUTES:
        return False
    if SpanAttributeKey.CHAT_USAGE in own and (span.parent_id is not None or SpanAttributeKey.MODEL in own):
        return False
    return SpanAttributeKey.MODEL in own or not (isinstance(span.inputs, dict) and "model" in span.inputs)


def _sanitized(value: str) -> str:
    """An attribute's stored value as MLflow's `sanitize_attributes` leaves it: a JSON-encoded string whose text is
    itself JSON of a string, object or list is stored as that text (one layer of encoding taken off)."""
    if not value.startswith('"') or value[1:2] not in (" ", "[", "{", "\\"):
        return value  # not a string, or one whose text cannot be JSON of a string, object or list (quick)
    try:
        inner = json.loads(value)
        if isinstance(inner, str) and isinstance(json.loads(inner), (str, dict, list)):
            return inner
    except (json.JSONDecodeError, TypeError):
        pass
    return value


def _parsed_string(value: str) -> str:
    """MLflow's `_try_parse_json_string`: the string a JSON-encoded string holds, else the value as it is."""
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value
    return parsed if isinstance(parsed, str) else value
