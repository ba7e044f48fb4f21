"""New traces written straight into a SQL tracking store's tables (SQLite or PostgreSQL), one transaction and
three multi-row inserts a batch, as the very rows MLflow's own `SqlAlchemyStore.log_spans` writes for them.

Two callers: the gateway's trace writer, writing its recorded traces into a database it can reach
(`records_writer`), and the `mlflow server` plugin store (internals/mlflow_store_plugin.py), writing the spans
MLflow's OTLP route has parsed (`TraceRowWriter.write_spans`). Both turn each span into a `SpanView` and share
the row building and the insert.

Why: `log_spans` costs 4-5.6 ms of CPU a trace (the gateway's `qa` traces, in batches of 100-500): per trace it
flushes the new trace row on its own, merges each tag (a SELECT and an INSERT), and updates the trace row it has
just written. The rows themselves are cheap.

What it leans on (none of it public API; tests/test_internals_mlflow_traces.py writes the same traces both ways
into two stores, SQLite and PostgreSQL, and compares every row of every table, so that a change of MLflow's
fails there, naming the table):

* the tables `trace_info`, `spans` and `trace_tags` (MLflow's models `SqlTraceInfo`, `SqlSpan`, `SqlTraceTag`)
  and what `log_spans` puts in them for a trace it creates: the trace's time range, status, previews
  (`_get_truncated_preview`), session and token usage columns (`aggregate_usage_from_span_nodes`),
  `db_payload_generation` 1; each span's row with its content (`Span.to_dict()`'s JSON, attribute values as
  `sanitize_attributes` leaves them); the tags `mlflow.artifactLocation` (`_get_trace_artifact_location_tag`),
  `mlflow.trace.spansLocation` and the root span's `mlflow.traceTag.*` (`_validate_trace_tag`);
* the store's `ManagedSessionMaker` (its SQLite pragmas, the commit or rollback) and `db_type`.

Only for what it matches: a SQLite or PostgreSQL store, MLflow's trace rollups and workspaces off, and traces of
the gateway's own shape: one root span, every span ended, no events, links or resource attributes of its own,
only the attributes the gateway sets (token usage on the root only and never beside a model, from which MLflow
would price it; no trace name; no `model` in the inputs or outputs of a span without a model, from which MLflow
would infer the LM). A batch with anything else is declined (False) for `log_spans` to write; so is a failure
(a trace already stored: the insert fails, nothing is kept). A speed-up: `MLFLOW_DSPY_SPEEDUPS=0` turns it off.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mlflow.tracing.constant import SpanAttributeKey

from mlflow_dspy.internals import speedups_enabled

DATABASES = ("sqlite", "postgresql")
_MARKER = "mlflowdspytraceid0123456789abcdef"  # a trace id that no URI quoting changes
_ANY_SPAN = frozenset({SpanAttributeKey.REQUEST_ID, SpanAttributeKey.SPAN_TYPE, SpanAttributeKey.INPUTS,
                       SpanAttributeKey.OUTPUTS, SpanAttributeKey.MODEL})
_ROOT_ONLY = frozenset({SpanAttributeKey.CHAT_USAGE, SpanAttributeKey.SESSION_ID})
_TAG_PREFIX = SpanAttributeKey.TRACE_TAG_PREFIX
_IGNORED_RESOURCE = ("telemetry.sdk.", "mlflow.")  # resource attributes log_spans does not store as tags


class SpanView(NamedTuple):
    """What the rows are made of, a span: its columns, and `content`, its `Span.to_dict()` (attribute values
    as the span holds them, before `sanitize_attributes`)."""

    span_id: str
    parent_id: str | None
    name: str
    span_type: str
    status: str  # OK, ERROR or UNSET
    start_ns: int
    end_ns: int | None
    content: dict


Rows = tuple[list[dict], list[dict], list[dict]]  # trace_info, spans, trace_tags


class TraceRowWriter:
    """Rows of new traces for one store, and their insert in one transaction."""

    def __init__(self, store: Any) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlSpan, SqlTraceInfo, SqlTraceTag
        from mlflow.store.tracking.utils.trace_analytics import (
            TOKEN_COLUMN_BY_KEY,
            bounded_model_dimension,
            token_count_or_none,
            validate_session_id,
        )
        from mlflow.tracing.constant import SpansLocation, TraceTagKey
        from mlflow.tracing.utils import SpanAggregationNode, aggregate_usage_from_span_nodes
        from mlflow.tracing.utils.truncation import _get_truncated_preview
        from mlflow.utils.mlflow_tags import MLFLOW_ARTIFACT_LOCATION
        from mlflow.utils.validation import _validate_trace_tag

        self.store = store
        self.tables = (SqlTraceInfo.__table__, SqlSpan.__table__, SqlTraceTag.__table__)
        self._model_dimension, self._token_count = bounded_model_dimension, token_count_or_none
        self._session_id, self._preview_of = validate_session_id, _get_truncated_preview
        self._usage = lambda root_id, usage: aggregate_usage_from_span_nodes(
            [SpanAggregationNode(root_id, None, usage)])
        self._token_columns = tuple(TOKEN_COLUMN_BY_KEY.items())
        self._artifact_tag = MLFLOW_ARTIFACT_LOCATION
        self._spans_location = (TraceTagKey.SPANS_LOCATION, SpansLocation.TRACKING_STORE.value)
        self._trace_name = TraceTagKey.TRACE_NAME
        self._locations: dict[str, tuple[str, str] | Any] = {}
        self._statements: dict[tuple, tuple[str, tuple[str, ...]]] = {}

        @functools.lru_cache(maxsize=4096)  # a model, version, route, variant: the same few values again and again
        def trace_tag(key: str, value: str) -> tuple[str, str] | None:
            """The tag log_spans makes of a root span's `mlflow.traceTag.<key>` attribute, or None (left out)."""
            try:
                return _validate_trace_tag(key, str(_parsed_string(value)))
            except Exception:
                return None

        self._trace_tag = trace_tag

    # -- the two callers' inputs ------------------------------------------------------------------------------
    def write_spans(self, experiment_id: str, spans: Sequence[Any]) -> bool:
        """MLflow `Span`s (as the OTLP route parses them), written as new traces (True), or declined (False)."""
        by_trace: dict[str, list[SpanView]] = {}
        for span in spans:
            resource = getattr(span._span, "resource", None)
            if resource is not None and any(not key.startswith(_IGNORED_RESOURCE) for key in resource.attributes):
                return False  # log_spans stores those as tags
            by_trace.setdefault(span.trace_id, []).append(SpanView(
                span.span_id, span.parent_id, span.name, span.span_type, span.status.status_code.value,
                span.start_time_ns, span.end_time_ns, span.to_dict()))
        return self.write(experiment_id, by_trace)

    def write(self, experiment_id: str, traces: dict[str, list[SpanView]]) -> bool:
        """Traces (trace id: its spans) written as new traces in one transaction (True), or declined (False)."""
        batch: Rows = ([], [], [])
        for trace_id, views in traces.items():
            built = self.rows(experiment_id, trace_id, views)
            if built is None:
                return False
            for rows, more in zip(batch, built, strict=True):
                rows.extend(more)
        if batch[0]:
            self.insert(batch)
        return True

    # -- the rows ------------------------------------------------------------------------------------------
    def rows(self, experiment_id: str, trace_id: str, views: Sequence[SpanView]) -> Rows | None:
        """The rows log_spans writes for a new trace of these spans, or None when it is not of the shape this
        path writes."""
        roots = [view for view in views if view.parent_id is None]
        if len(roots) != 1 or not experiment_id.isdigit():
            return None
        root = roots[0]
        span_rows = []
        for view in views:
            attributes = view.content["attributes"]
            if view.content.get("links") or view.content.get("events") or not view.end_ns:
                return None
            for key, value in attributes.items():
                attributes[key] = _sanitized(value)
            if not _own_shape(attributes, view is root):
                return None
            view.content["links"] = []
            model = attributes.get(SpanAttributeKey.MODEL)
            span_rows.append({
                "trace_id": trace_id, "experiment_id": int(experiment_id), "span_id": view.span_id,
                "parent_span_id": view.parent_id, "name": view.name, "type": view.span_type,
                "status": view.status, "start_time_unix_nano": view.start_ns, "end_time_unix_nano": view.end_ns,
                "content": json.dumps(view.content, ensure_ascii=False),
                "input_cost": None, "output_cost": None, "total_cost": None,
                "model_name": self._model_dimension(_parsed_string(model)) if model is not None else None,
                "model_provider": None,
            })
        root_attributes = root.content["attributes"]
        start_ms = min(view.start_ns for view in views) // 1_000_000
        end_ms = max(view.end_ns for view in views) // 1_000_000
        info = {"request_id": trace_id, "experiment_id": int(experiment_id), "timestamp_ms": start_ms,
                "execution_time_ms": end_ms - start_ms,  # as log_spans leaves it (every span here has an end)
                "status": "ERROR" if root.status == "ERROR" else "OK", "client_request_id": None,
                "request_preview": self._preview(root_attributes.get(SpanAttributeKey.INPUTS), "user"),
                "response_preview": self._preview(root_attributes.get(SpanAttributeKey.OUTPUTS), "assistant"),
                "db_payload_generation": 1, "trace_name": None, "session_id": None,
                **{column: None for _, column in self._token_columns}}
        if session := root_attributes.get(SpanAttributeKey.SESSION_ID):
            info["session_id"] = self._session_id(_parsed_string(session))
        if (usage := root_attributes.get(SpanAttributeKey.CHAT_USAGE)) is not None:
            try:
                usage = json.loads(usage)
            except (json.JSONDecodeError, TypeError):
                return None
            if isinstance(usage, dict) and (total := self._usage(root.span_id, usage)):
                info.update((column, self._token_count(total.get(key))) for key, column in self._token_columns)
        # In the order log_spans writes them (a later tag of the same key takes the place of an earlier one).
        tags = {self._artifact_tag: self._artifact_location(experiment_id, trace_id),
                self._spans_location[0]: self._spans_location[1]}
        for key, value in root_attributes.items():
            if key.startswith(_TAG_PREFIX) and (tag := self._trace_tag(key[len(_TAG_PREFIX):], value)) is not None:
                if tag[0] == self._trace_name:
                    return None  # log_spans keeps it in the trace's own column
                tags[tag[0]] = tag[1]
        return [info], span_rows, [{"request_id": trace_id, "key": k, "value": v} for k, v in tags.items()]

    def _preview(self, value: str | None, role: str) -> str | None:
        if not value:
            return None
        try:
            return self._preview_of(value, role=role)
        except Exception:
            return None  # as log_spans: a preview that fails is left out

    def _artifact_location(self, experiment_id: str, trace_id: str) -> str:
        """MLflow's own tag value for the trace, worked out once an experiment: for a marker trace id, then the
        marker replaced (or, if the marker does not come back as it went, asked again for each trace)."""
        store = self.store
        if experiment_id not in self._locations:
            experiment = store.get_experiment(experiment_id)
            value = store._get_trace_artifact_location_tag(experiment, _MARKER).value
            self._locations[experiment_id] = tuple(value.split(_MARKER)) if value.count(_MARKER) == 1 else experiment
        known = self._locations[experiment_id]
        if isinstance(known, tuple):
            return f"{known[0]}{trace_id}{known[1]}"
        return store._get_trace_artifact_location_tag(known, trace_id).value

    # -- the insert ----------------------------------------------------------------------------------------
    def insert(self, batch: Rows) -> None:
        """The rows inserted in one transaction (the store's own session: its pragmas, commit or rollback)."""
        from sqlalchemy import insert

        with self.store.ManagedSessionMaker(read_only=False) as session:
            if self.store.db_type != "sqlite":
                for table, rows in zip(self.tables, batch, strict=True):
                    session.execute(insert(table), rows)  # SQLAlchemy's multi-row VALUES (insertmanyvalues)
                return
            cursor = session.connection().connection.cursor()  # the DBAPI's, in the session's transaction
            try:
                for table, rows in zip(self.tables, batch, strict=True):
                    sql, names = self._statement(table, session, rows[0])
                    cursor.executemany(sql, [tuple(row[name] for name in names) for row in rows])
            finally:
                cursor.close()

    def _statement(self, table: Any, session: Any, row: dict) -> tuple[str, tuple[str, ...]]:
        """The table's INSERT for the row's columns, compiled once by SQLAlchemy for the store's dialect, and the
        order its parameters take (SQLite's executemany of plain tuples: the least CPU a row)."""
        from sqlalchemy import bindparam, insert

        key = (table.name, tuple(row))
        if key not in self._statements:
            compiled = insert(table).values({name: bindparam(name) for name in row}).compile(
                dialect=session.get_bind().dialect)
            self._statements[key] = (str(compiled), tuple(compiled.positiontup))
        return self._statements[key]


def row_writer(store: Any) -> TraceRowWriter | None:
    """A `TraceRowWriter` for `store`; None when it is not a SQL store this path knows, MLflow's trace rollups or
    workspaces are on, or the speed-ups are off."""
    if not speedups_enabled():
        return None
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.store.tracking.utils.sql_trace_rollups import rollups_enabled

        if (not isinstance(store, SqlAlchemyStore) or getattr(store, "db_type", None) not in DATABASES
                or rollups_enabled() or store.supports_workspaces):
            return None
        return TraceRowWriter(store)
    except ImportError:
        return None


def records_writer(store: Any, span_dicts: Callable[[Any], list[dict]]) -> Callable[[str, Sequence[Any]], bool] | None:
    """For the gateway's writer: a function writing a batch of recorded traces into `store` (True), or declining
    the batch (False) for `log_spans` to write; None when `row_writer` finds no fast path for `store`."""
    writer = row_writer(store)
    if writer is None:
        return None

    def write(experiment_id: str, records: Sequence[Any]) -> bool:
        traces = {}
        for record in records:
            traces[record.request_id] = [
                SpanView(span.span_id, span.parent_id, span.name, span.span_type, "ERROR" if span.error else "OK",
                         d["start_time_unix_nano"], d["end_time_unix_nano"], d)
                for span, d in zip(record.spans, span_dicts(record), strict=True)]
        return len(traces) == len(records) and writer.write(experiment_id, traces)

    return write


def _own_shape(attributes: dict[str, str], root: bool) -> bool:
    """Whether log_spans would store the span's (sanitized) attributes as they are: only the gateway's own, token
    usage and the session on the root only, usage never beside a model (MLflow would price it), and no `model`
    in the inputs or outputs of a span without a model attribute (MLflow would take it for the LM's)."""
    for key in attributes:
        if key not in _ANY_SPAN and not (root and (key in _ROOT_ONLY or key.startswith(_TAG_PREFIX))):
            return False
    if SpanAttributeKey.MODEL in attributes:
        return SpanAttributeKey.CHAT_USAGE not in attributes
    return not any('"model"' in (attributes.get(key) or "")
                   for key in (SpanAttributeKey.INPUTS, SpanAttributeKey.OUTPUTS))


def _sanitized(value: str) -> str:
    """An attribute's stored value as MLflow's `sanitize_attributes` leaves it: a JSON-encoded string whose text is
    itself JSON of a string, object or list is stored as that text (one layer of encoding taken off)."""
    if not isinstance(value, str) or not value.startswith('"') or value[1:2] not in (" ", "[", "{", "\\"):
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
