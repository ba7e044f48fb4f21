"""A trace recorded by the gateway, written through internals/mlflow_traces.py (MLflow's private
`TracingClient.log_spans`, `Span.from_dict`'s format and its attribute keys) into a real store, reads back
through MLflow's public API as the trace it was: its id, spans, tree, tags, session, usage and model."""

from __future__ import annotations

import inspect

import mlflow
from mlflow.entities import Span
from mlflow.tracing.client import TracingClient

from mlflow_dspy.internals.mlflow_traces import LM_MODEL, TOKEN_USAGE, span_dicts, trace_store
from mlflow_dspy.runtime.trace_record import SpanRecord, TraceRecord


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
