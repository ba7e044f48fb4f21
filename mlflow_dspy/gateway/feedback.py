"""`POST /v1/feedback`: a user's verdict on an answer, recorded as an MLflow assessment on its trace.

The answer's `x-mlflow-trace-id` header names the trace. The body:

    {"trace_id": "tr-...", "value": true | false | number, "rationale": "...",
     "expected": {"answer": "..."}, "source": "who gave it"}

`value` becomes MLflow feedback named `user_feedback` (`mlflow.log_feedback`,
from a HUMAN source), and `expected`, the outputs the answer should have had,
an expectation named `expected_outputs` (`mlflow.log_expectation`): `traces
export` turns both into data for the next version. `expected` names the
program's own output fields; any other is a 400 naming it.

A trace is written a moment after its answer (by the trace writer): feedback
on an answer's trace id (any worker's) not written yet waits for it, a few
seconds at most. An unknown trace is a 404, as is any feedback when tracing is
off.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from pydantic import Field, StrictBool, StrictFloat, StrictInt
from starlette.responses import JSONResponse

from mlflow_dspy.gateway.errors import GatewayError, invalid_request
from mlflow_dspy.gateway.openai_wire import Strict, shown
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.trace_record import EXPECTATION_NAME, FEEDBACK_NAME

TRACE_ID = re.compile(r"tr-[0-9a-f]{32}")  # what the gateway's answers carry
WAIT_FOR_WRITE = 10.0  # seconds feedback waits for an answer's trace to be written
WAIT_FOR_WRITER = 60.0  # ... once the trace writer has started (MLflow's import: seconds on a busy machine)


class FeedbackRequest(Strict):
    trace_id: str = Field(min_length=1, max_length=200, description="the answer's x-mlflow-trace-id header")
    value: StrictBool | StrictInt | StrictFloat = Field(description="true or false, or a score")
    rationale: str | None = Field(default=None, max_length=10_000)
    expected: dict[str, object] | None = Field(default=None, description="the outputs the answer should have had")
    source: str | None = Field(default=None, max_length=200, description="who gave it (default: api)")


class FeedbackService:
    def __init__(self) -> None:
        self.tracing = False  # set once the trace writer runs
        self.writer_started: Callable[[float], bool] = lambda timeout: True  # blocks until the writer has started

    async def create(self, body: FeedbackRequest,
                     host_of: Callable[[str | None, str | None], ProgramHost | None]) -> JSONResponse:
        """Record a verdict; `host_of(version, name)` finds the program that answered, from its trace's tags (to
        check `expected`'s fields)."""
        if not self.tracing:
            raise GatewayError(404, "tracing is off on this gateway (--no-traces, or its tracking store failed at "
                                    "start-up): there is no trace to give feedback on", "not_found_error",
                               param="trace_id", code="tracing_off")
        trace = await self._trace(body.trace_id)
        # Only the traces of answers a gateway gave (their tags say so): no assessments on anything else.
        if trace is None or "mlflow_dspy.model" not in trace.info.tags:
            raise GatewayError(404, f"no answer's trace '{shown(body.trace_id, 200)}' in the tracking store",
                               "not_found_error", param="trace_id", code="trace_not_found")
        if body.expected is not None:
            tags = trace.info.tags
            _check_expected(body.expected, host_of(tags.get("mlflow_dspy.version"), tags.get("mlflow_dspy.model")))
        try:
            ids = await asyncio.to_thread(self._record, body)
        except Exception as exc:
            raise _store_down(exc) from None
        return JSONResponse({"trace_id": body.trace_id, "assessments": ids})

    async def _trace(self, trace_id: str):
        """The trace; one of ours not written yet (an answer's trace id, as a gateway makes them, from this
        worker or another) is waited for, a few seconds at most. None if there is none."""
        from mlflow import MlflowClient

        client = MlflowClient()
        wait = WAIT_FOR_WRITE if TRACE_ID.fullmatch(trace_id) else 0
        if wait:  # a writer still starting has written nothing yet: the wait counts from its start
            await asyncio.to_thread(self.writer_started, WAIT_FOR_WRITER)
        deadline = time.monotonic() + wait
        while True:
            try:
                trace = await asyncio.to_thread(client.get_trace, trace_id)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise _store_down(exc) from None  # the store failed: not the client's mistake
                trace = None
            if trace is not None or time.monotonic() >= deadline:
                return trace
            await asyncio.sleep(0.2)  # no thread held while waiting

    @staticmethod
    def _record(body: FeedbackRequest) -> list[str]:
        import mlflow
        from mlflow.entities import AssessmentSource, AssessmentSourceType

        source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=body.source or "api")
        recorded = [mlflow.log_feedback(trace_id=body.trace_id, name=FEEDBACK_NAME, value=body.value,
                                        rationale=body.rationale, source=source)]
        if body.expected is not None:
            recorded.append(mlflow.log_expectation(trace_id=body.trace_id, name=EXPECTATION_NAME,
                                                   value=body.expected, source=source))
        return [assessment.assessment_id for assessment in recorded]


def _store_down(exc: Exception) -> GatewayError:
    return GatewayError(503, f"the tracking store did not answer ({type(exc).__name__}); retry later",
                        "service_unavailable", code="tracking_store_unavailable", headers={"Retry-After": "5"})


def _check_expected(expected: dict[str, object], host: ProgramHost | None) -> None:
    if not expected:
        raise invalid_request("'expected' is empty: give the outputs the answer should have had", param="expected")
    if host is None:
        return  # the version that answered is no longer served here: its fields are not known
    outputs = [field.name for field in host.program.mapping.outputs]
    unknown = [name for name in expected if name not in outputs]
    if unknown:
        raise invalid_request(f"'expected' names '{unknown[0]}', which is not an output of this program; its outputs "
                              f"are {', '.join(outputs)}", param=f"expected.{unknown[0]}")
