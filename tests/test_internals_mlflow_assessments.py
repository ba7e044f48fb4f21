"""The canary of internals/mlflow_assessments.py: an assessment written through `bounded_writer` into a real
`mlflow server` reads back, through MLflow's public API, as the one `mlflow.log_feedback` writes; an unknown
trace is MLflow's RESOURCE_DOES_NOT_EXIST; a stopped server fails one try at once instead of retrying for
minutes. It fails, naming what changed, when MLflow's HTTP client or its assessments endpoint change."""

from __future__ import annotations

import time
from contextlib import ExitStack

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import AssessmentSource, AssessmentSourceType, Expectation, Feedback

from mlflow_dspy.internals.mlflow_assessments import bounded_writer
from tests.support.processes import free_port
from tests.test_trace_outage import tracking_server

pytestmark = pytest.mark.slow


def test_the_bounded_writer_writes_what_mlflow_writes_and_fails_fast_when_the_server_is_gone(tmp_path):
    assert bounded_writer(f"sqlite:///{tmp_path / 'local.db'}", 5.0) is None  # other stores: MLflow's own API
    with ExitStack() as stack:
        server = stack.enter_context(ExitStack())
        url = server.enter_context(tracking_server(tmp_path, free_port()))
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("canary")
        with mlflow.start_span("answer") as span:
            span.set_inputs({"question": "q"})
        trace_id = span.trace_id
        mlflow.flush_trace_async_logging()
        source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id="alice")
        write = bounded_writer(url, 5.0)
        assert write is not None, "an HTTP store is no longer a RestStore"
        ours = write(Feedback(name="user_feedback", value=0.5, rationale="why", source=source, trace_id=trace_id))
        expected = write(Expectation(name="expected_outputs", value={"answer": "Paris"}, source=source,
                                     trace_id=trace_id))
        theirs = mlflow.log_feedback(trace_id=trace_id, name="user_feedback", value=0.5, rationale="why",
                                     source=source)
        stored = {a.assessment_id: a for a in MlflowClient(url).get_trace(trace_id).info.assessments}
        assert ours.assessment_id in stored and expected.assessment_id in stored, "the server did not store it"

        def shape(assessment) -> tuple:
            return (assessment.name, assessment.value, assessment.rationale, assessment.source.source_type,
                    assessment.source.source_id, assessment.trace_id)

        assert shape(stored[ours.assessment_id]) == shape(stored[theirs.assessment_id]) == shape(ours)
        assert stored[expected.assessment_id].value == {"answer": "Paris"}
        with pytest.raises(Exception) as unknown:
            write(Feedback(name="user_feedback", value=True, source=source, trace_id="tr-" + "0" * 32))
        assert getattr(unknown.value, "error_code", None) == "RESOURCE_DOES_NOT_EXIST", unknown.value

        server.close()  # SIGKILL: connections are refused now
        began = time.monotonic()
        with pytest.raises(Exception) as down:
            write(Feedback(name="user_feedback", value=True, source=source, trace_id=trace_id))
        took = time.monotonic() - began
    from mlflow_dspy.internals.mlflow_traces import DOWN, failure_kind

    assert failure_kind(down.value) == DOWN, down.value
    assert took < 5, f"one try at a stopped server took {took:.1f} s: MLflow's client retried"
