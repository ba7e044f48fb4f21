"""A trace recorded by the gateway, written through internals/mlflow_traces.py (MLflow's private
`TracingClient.log_spans`, `Span.from_dict`'s format and its attribute keys) into a real store, reads back
through MLflow's public API as the trace it was: its id, spans, tree, tags, session, usage and model. An HTTP
store down at the first write is written to once it is back, after `forget_failed_lookups` (MLflow caches the
failed /version lookup), and what a store's errors say is read as down, failed or refused. The SQLite fast path
(internals/mlflow_sql_traces.py) writes the very rows log_spans writes, every table compared, and leaves to
log_spans what it does not know."""

from __future__ import annotations

import contextlib
import copy
import http.server
import inspect
import socket
import threading

import mlflow
import pytest
from mlflow.entities import Span
from mlflow.tracing.client import TracingClient

from mlflow_dspy.internals.mlflow_sql_traces import records_writer
from mlflow_dspy.internals.mlflow_traces import (
    DOWN,
    FAILED,
    LM_MODEL,
    REFUSED,
    TOKEN_USAGE,
    failure_kind,
    forget_failed_lookups,
    span_dicts,
    trace_store,
)
from mlflow_dspy.runtime.trace_record import SpanRecord, TraceRecord
from tests.support.mlflow_rows import assert_same_rows


def a_record() -> TraceRecord:
    root = SpanRecord("a" * 16, None, "Predict.forward", "LLM", 1_000, {"question": "Why?"}, end_ns=9_000,
                      outputs={"answer": "Because."},
                      attributes={TOKEN_USAGE: {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}})
    lm = SpanRecord("b" * 16, "a" * 16, "LM.__call__", "CHAT_MODEL", 2_000, {"messages": []}, end_ns=8_000,
                    outputs=["Because."], attributes={LM_MODEL: "openai/stub"})
    failed = SpanRecord("c" * 16, "a" * 16, "Tool.forward", "CHAIN", 3_000, {}, end_ns=4_000, error="KeyError")
    return TraceRecord(tags={"mlflow_dspy.model": "dspy-qa", "mlflow_dspy.version": "dspy-qa/3"},
                       session="user-42", spans=[root, lm, failed])


def test_what_it_leans_on_is_still_there():
    assert list(inspect.signature(TracingClient.log_spans).parameters)[1:] == ["location", "spans"], \
        "MLflow's TracingClient.log_spans changed: check internals/mlflow_traces.py's trace_store"
    assert TOKEN_USAGE == "mlflow.chat.tokenUsage" and LM_MODEL == "mlflow.llm.model"


def test_the_span_dictionaries_are_what_span_from_dict_reads():
    record = a_record()
    spans = [Span.from_dict(d) for d in span_dicts(record)]
    assert {s.trace_id for s in spans} == {record.request_id}
    assert spans[0].parent_id is None and spans[1].parent_id == spans[0].span_id
    assert spans[0].inputs == {"question": "Why?"} and spans[0].outputs == {"answer": "Because."}


def test_a_record_written_through_it_reads_back_through_mlflows_public_api(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("traces")
    record = a_record()
    trace_store(uri)(experiment, [record])
    trace = mlflow.get_trace(record.request_id)
    assert trace is not None, "a trace written through internals/mlflow_traces.py is not in the store"
    assert trace.info.tags["mlflow_dspy.version"] == "dspy-qa/3", "the root's mlflow.traceTag.* are not tags"
    assert trace.info.trace_metadata.get("mlflow.trace.session") == "user-42", "session.id is not the session"
    assert trace.info.token_usage == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    by_name = {span.name: span for span in trace.data.spans}
    assert set(by_name) == {"Predict.forward", "LM.__call__", "Tool.forward"}
    assert by_name["LM.__call__"].parent_id == by_name["Predict.forward"].span_id
    assert by_name["LM.__call__"].span_type == "CHAT_MODEL"
    assert by_name["LM.__call__"].attributes[LM_MODEL] == "openai/stub"
    assert by_name["Tool.forward"].status.status_code.value == "ERROR"
    found = mlflow.search_traces(locations=[experiment], return_type="list",
                                 filter_string="tags.`mlflow_dspy.model` = 'dspy-qa'")
    assert [t.info.trace_id for t in found] == [record.request_id]


# -- an HTTP store that goes down and comes back --------------------------------------------------------------
class _Store(http.server.BaseHTTPRequestHandler):
    """What `log_spans` asks of an HTTP tracking server: its /version, then the OTLP spans."""

    posted: list[tuple[str, str | None]] = []

    def do_GET(self):
        self._answer(b"3.17.2" if self.path == "/version" else b"", 200 if self.path == "/version" else 404)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.posted.append((self.path, self.headers.get("x-mlflow-experiment-id")))
        self._answer(b"{}", 200)

    def _answer(self, body: bytes, status: int):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(port: int):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Store)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_store_down_at_the_first_write_is_written_to_once_back_and_its_failures_read_as_down(monkeypatch):
    from mlflow.store.tracking.rest_store import RestStore

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as the writer process runs it
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket is closed
    forget_failed_lookups()
    write = trace_store(f"http://127.0.0.1:{port}")
    with pytest.raises(NotImplementedError, match="could not identify MLflow server version") as down:
        write("7", [a_record()])
    assert failure_kind(down.value) == DOWN, "MLflow's error for a failed /version lookup changed: see failure_kind"
    with _serving(port):
        # MLflow still remembers the failed lookup: without the workaround, nothing is written while the store is up.
        with pytest.raises(NotImplementedError):
            write("7", [a_record()])
        assert hasattr(RestStore._get_server_version, "cache_clear"), \
            "RestStore._get_server_version is no longer an lru_cache: check forget_failed_lookups"
        assert forget_failed_lookups()
        _Store.posted.clear()
        write("7", [a_record()])
        assert _Store.posted == [("/v1/traces", "7")], "log_spans no longer posts OTLP spans with the experiment id"
    # The server gone after a successful lookup: the POST fails, read as the store being down.
    with pytest.raises(Exception) as gone:
        write("7", [a_record()])
    assert failure_kind(gone.value) == DOWN, f"an unreachable server's error changed: {gone.value!r}"


def test_what_a_store_says_of_a_batch_is_read_as_down_failed_or_refused():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE

    assert failure_kind(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)) == DOWN
    assert failure_kind(MlflowException("boom", error_code=INTERNAL_ERROR)) == FAILED
    assert failure_kind(MlflowException("bad span", error_code=BAD_REQUEST)) == REFUSED
    assert failure_kind(NotImplementedError("log_spans is not supported: MLflow server version 3.1 is less than 3.4")) \
        == REFUSED
    assert failure_kind(ConnectionRefusedError()) == DOWN


# -- the SQLite fast path: the very rows log_spans writes ------------------------------------------------------
def _varied_records() -> list[TraceRecord]:
    """Records of the gateway's shape with what could tell two writers apart: non-ASCII text, an error, a session,
    no outputs, a string output that is itself JSON, a tag value that looks like JSON, long text, no usage."""
    first, second, third, fourth = (a_record() for _ in range(4))
    second.session = "usér-42 ✓"
    second.spans[0].outputs = None
    second.spans[0].error = "ValueError"
    third.spans[0].inputs = {"question": 'Ünïcödé "quoted" {"a": 1}', "history": [{"role": "user", "content": "x"}]}
    third.spans[0].outputs = '{"answer": "a string holding JSON"}'
    third.spans[1].outputs = ['"[1, 2]"']
    third.tags["mlflow_dspy.variant"] = '["challenger"]'
    fourth.spans[0].attributes = {}
    fourth.spans[0].inputs = {"question": "x" * 3000}
    fourth.tags["mlflow_dspy.session"] = '"quoted"'
    return [first, second, third, fourth]


def test_the_sqlite_fast_path_writes_the_very_rows_log_spans_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_DSPY_SPEEDUPS", raising=False)
    records = _varied_records()
    stores = {}
    for way in ("log_spans", "fast"):
        uri = f"sqlite:///{tmp_path / way}.db"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("traces")
        client = TracingClient(uri)
        if way == "log_spans":
            client.log_spans(experiment, [Span.from_dict(d) for record in records for d in span_dicts(record)])
        else:
            write = records_writer(client.store, span_dicts)
            assert write is not None, "the SQLite fast path no longer finds what it needs in MLflow: see its imports"
            assert write(experiment, copy.deepcopy(records)), "the fast path declined records of the gateway's shape"
        stores[way] = uri
    assert_same_rows(stores["log_spans"], stores["fast"])
    # And MLflow reads them back as the traces they were.
    trace = mlflow.get_trace(records[1].request_id)
    assert trace.info.trace_metadata.get("mlflow.trace.session") == "usér-42 ✓"
    assert trace.info.state.value == "ERROR" and trace.data.spans[0].outputs is None


def test_the_sqlite_fast_path_leaves_to_log_spans_what_it_does_not_know(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("traces")
    store = TracingClient(uri).store
    write = records_writer(store, span_dicts)
    priced = a_record()
    priced.spans[1].attributes[TOKEN_USAGE] = {"input_tokens": 1}  # usage beside a model: MLflow would price it
    named_model = a_record()
    named_model.spans[0].inputs = {"model": "gpt-x"}  # MLflow would take the input for the LM's name
    foreign = a_record()
    foreign.spans[2].attributes["gen_ai.system"] = "openai"
    for record in (priced, named_model, foreign):
        assert write(experiment, [a_record(), record]) is False
    assert mlflow.search_traces(locations=[experiment], return_type="list") == []  # nothing half-written
    # A trace already stored: the fast path fails (one transaction, nothing kept), trace_store then writes it with
    # log_spans, which writes over it.
    again = a_record()
    trace_store(uri)(experiment, [again])
    trace_store(uri)(experiment, [again])
    assert len(mlflow.search_traces(locations=[experiment], return_type="list")) == 1
    # Not a SQLite store, or the speed-ups off: no fast path.
    monkeypatch.setenv("MLFLOW_DSPY_SPEEDUPS", "0")
    assert records_writer(store, span_dicts) is None
    monkeypatch.delenv("MLFLOW_DSPY_SPEEDUPS")
    assert records_writer(object(), span_dicts) is None
