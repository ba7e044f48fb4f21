"""Traces recorded cheaply in the serving process and written by a process of their own: the spans a
program's run leaves, their parents and usage, and the writer flushing them to a real tracking store."""

from __future__ import annotations

import asyncio

import dspy
import mlflow
import pytest
from dspy.utils.dummies import DummyLM
from dspy.utils.exceptions import AdapterParseError

from mlflow_dspy.gateway.tracing import TraceExporter
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.trace_record import RECORDER, TraceRecord, jsonable, recording
from tests.support.cli import seeded_store
from tests.support.examples import example_chat

ANSWERS = {f"Question {i}?": {"reasoning": f"because {i}", "answer": str(i)} for i in range(20)}


@pytest.fixture
def host():
    # No recorder installed anywhere: a traced call adds it to its own settings.
    return ProgramHost(example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}?"}]


async def test_a_run_is_recorded_as_program_and_lm_spans_with_the_usage_on_the_root(host):
    record = TraceRecord(tags={"mlflow_dspy.model": "qa"})
    prediction = await host.answer(ask(3), trace=record)
    assert prediction.answer == "3"
    names = [span.name for span in record.spans]
    # The root is the program itself, with its own inputs (the chat front only maps the conversation).
    assert names[0] == "ChainOfThought.forward" and "LM.__call__" in names
    assert record.spans[0].inputs == {"question": "Question 3?", "history": {"messages": []}}
    assert not any("Adapter" in name for name in names)  # format and parse repeat the signature: left out
    by_id = {span.span_id: span for span in record.spans}
    root = record.spans[0]
    assert root.parent_id is None and all(s.parent_id in by_id for s in record.spans[1:])
    assert root.outputs["answer"] == "3" and all(s.end_ns >= s.start_ns for s in record.spans)
    lm = next(s for s in record.spans if s.name == "LM.__call__")
    assert "Question 3?" in str(lm.inputs) and "because 3" in str(lm.outputs)


async def test_concurrent_runs_each_record_into_their_own_trace(host):
    records = [TraceRecord() for _ in range(20)]
    await asyncio.gather(*(host.answer(ask(i), trace=records[i]) for i in range(20)))
    for i, record in enumerate(records):
        texts = str([span.inputs for span in record.spans])
        assert f"Question {i}?" in texts
        assert not any(f"Question {j}?" in texts for j in range(20) if j != i)


async def test_streams_are_recorded_too_and_nothing_is_recorded_without_a_trace(host):
    record = TraceRecord()
    items = [item async for item in host.stream(ask(5), trace=record)]
    # A stream runs the program itself (the chat mapping already applied): it is the root, as in a call.
    assert items[-1].answer == "5" and record.spans[0].name == "ChainOfThought.forward"
    assert record.spans[0].parent_id is None
    assert record.spans[0].inputs == {"question": "Question 5?", "history": {"messages": []}}
    recorded = len(record.spans)
    with recording(None):
        await host.answer(ask(6))  # no record: the callback records nothing anywhere
    assert len(record.spans) == recorded


async def test_a_failure_is_recorded_by_its_type_and_never_a_key(host):
    record = TraceRecord()
    with pytest.raises(AdapterParseError):
        await host.answer([{"role": "user", "content": "not in the dummy's answers"}], {"api_key": "sk-secret"},
                          trace=record)
    assert "AdapterParseError" in {span.error for span in record.spans}
    assert "sk-secret" not in str([(s.inputs, s.outputs, s.attributes) for s in record.spans])


def test_values_become_plain_json_data():
    history = dspy.History(messages=[{"question": "a", "answer": "b"}])
    assert jsonable({"h": history, "p": dspy.Prediction(answer="x"), "t": "x" * 30_000})["h"] == {
        "messages": [{"question": "a", "answer": "b"}]}
    assert len(jsonable("x" * 30_000)) == 20_001


async def _recorded(host: ProgramHost, count: int) -> list[TraceRecord]:
    records = [TraceRecord(tags={"mlflow_dspy.model": "qa", "mlflow_dspy.request_id": f"req-{i}"},
                           session=f"user-{i}") for i in range(count)]
    for i, record in enumerate(records):
        await host.answer(ask(i % 20), trace=record)
    return records


@pytest.mark.e2e  # the trace writer is a process of its own
def test_the_writer_process_writes_every_queued_trace_by_the_stop(host, tmp_path):
    uri = seeded_store(tmp_path)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("traces")
    records = asyncio.run(_recorded(host, 120))
    exporter = TraceExporter(uri, experiment, queue_size=500, flush_timeout=60)
    exporter.start()
    assert all(exporter.submit(record) for record in records)
    exporter.close()
    assert (exporter.queued, exporter.written.value, exporter.dropped) == (120, 120, 0)
    traces = mlflow.search_traces(locations=[experiment], return_type="list", max_results=500)
    assert {t.info.trace_id for t in traces} == {r.request_id for r in records}
    one = mlflow.get_trace(records[7].request_id)
    assert one.info.tags["mlflow_dspy.request_id"] == "req-7"
    assert one.data.spans[0].inputs == {"question": "Question 7?", "history": {"messages": []}}
    assert mlflow.search_traces(locations=[experiment], return_type="list",
                                filter_string="tags.`mlflow_dspy.request_id` = 'req-9'")[0].info.trace_id \
        == records[9].request_id


@pytest.mark.e2e  # the trace writer is a process of its own
def test_a_full_queue_or_a_failing_store_drops_traces_and_counts_them(host, tmp_path):
    records = asyncio.run(_recorded(host, 6))
    full = TraceExporter(f"sqlite:///{tmp_path / 'a.db'}", "0", queue_size=2, flush_timeout=5)  # never started
    assert [full.submit(r) for r in records[:3]] == [True, True, False]
    assert full.dropped == 1
    down = tmp_path / "not-a-directory"
    down.write_text("a file where the store's directory should be")
    broken = TraceExporter(f"sqlite:///{down / 'mlflow.db'}", "0", queue_size=10, flush_timeout=30)
    broken.start()
    assert all(broken.submit(r) for r in records)
    broken.close()
    assert broken.written.value == 0 and broken.dropped == 6


def test_no_key_an_lm_call_carries_reaches_a_trace():
    # DSPy hands the callback an LM call's extra arguments nested under "kwargs" (inspect.getcallargs).
    inputs = {"prompt": None, "messages": [{"role": "user", "content": "Anything?"}],
              "kwargs": {"api_key": "sk-secret-1", "extra_headers": {"Authorization": "Bearer sk-secret-2"},
                         "api_base": "https://user:sk-secret-3@llm.example/v1?token=sk-secret-4", "temperature": 0}}
    record = TraceRecord()
    with recording(record):
        RECORDER.on_lm_start("call-1", DummyLM([]), inputs)
        RECORDER.on_lm_end("call-1", ["an answer"])
    recorded = str([(span.inputs, span.outputs, span.attributes) for span in record.spans])
    assert "Anything?" in recorded and "temperature" in recorded and "llm.example" in recorded
    assert "sk-secret" not in recorded


def test_the_recorder_is_added_for_a_traced_call_only(host):
    assert RECORDER not in dspy.settings.callbacks
    with host.context(trace=TraceRecord()):
        assert RECORDER in dspy.settings.callbacks
    with host.context():
        assert RECORDER not in dspy.settings.callbacks
