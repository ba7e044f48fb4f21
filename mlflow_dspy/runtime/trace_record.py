"""A request's trace, recorded cheaply while the program runs, for another process to write.

MLflow's DSPy autolog builds OpenTelemetry spans, serializes every input and
output, and exports them from the serving process: measured here, tracing that
way cost 65% of the gateway's throughput. This records the same story as plain
data instead: one span per module call, per LM call and per tool call (the adapter's format
and parse steps, which repeat the signature on every call, are left out), with
their inputs, outputs, timing, errors and the token usage, into a `TraceRecord`
that the gateway hands to its trace writer (gateway/tracing.py).

`RECORDER`, a DSPy callback, is added to the settings of a traced call only
(ProgramHost.context), and records into that call's `recording(record)` (a
ContextVar, so concurrent requests, streams and program threads each record
into their own). Secret-named arguments never reach a record (`redacted`).
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dspy.utils.callback import BaseCallback

from mlflow_dspy.internals.mlflow_traces import LM_MODEL
from mlflow_dspy.lm_engine.credentials import clean_url, is_secret_name

# The assessments a user's verdict on an answer becomes (gateway/feedback.py writes them,
# lifecycle/traces_export.py reads them).
FEEDBACK_NAME = "user_feedback"
EXPECTATION_NAME = "expected_outputs"

# Longer texts are cut in a trace (a trace is for reading, not an archive of every byte).
MAX_TEXT = 20_000


@dataclass
class SpanRecord:
    span_id: str  # 16 hex digits
    parent_id: str | None
    name: str
    span_type: str
    start_ns: int
    inputs: Any
    end_ns: int | None = None
    outputs: Any = None
    error: str | None = None  # the exception's type: its message may hold what a trace must not
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceRecord:
    """One request's trace: its id (known before the program runs, so an answer can name it), its tags
    and session, and the spans recorded while the program ran."""

    trace_id: str = field(default_factory=lambda: secrets.token_hex(16))  # 32 hex digits
    tags: dict[str, str] = field(default_factory=dict)
    session: str | None = None
    spans: list[SpanRecord] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        """MLflow's id for the trace (`tr-` and the 32 hex digits)."""
        return f"tr-{self.trace_id}"


_RECORD: contextvars.ContextVar[TraceRecord | None] = contextvars.ContextVar("mlflow_dspy_trace", default=None)
_PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlflow_dspy_span", default=None)


@contextmanager
def recording(record: TraceRecord | None) -> Iterator[TraceRecord | None]:
    """Record the program calls made inside into `record` (nothing when it is None)."""
    if record is None:
        yield None
        return
    token, parent = _RECORD.set(record), _PARENT.set(None)
    try:
        yield record
    finally:
        _PARENT.reset(parent)
        _RECORD.reset(token)


class RecordingCallback(BaseCallback):
    """Records module and LM calls into the active TraceRecord; costs a ContextVar lookup otherwise."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[SpanRecord, contextvars.Token]] = {}
        self._chat_fronts: dict[str, TraceRecord | None] = {}  # ChatProgram calls: not spans of their own

    def _start(self, call_id: str, name: str, span_type: str, inputs: Any, **attributes: Any) -> None:
        record = _RECORD.get()
        if record is None:
            return
        span = SpanRecord(secrets.token_hex(8), _PARENT.get(), name, span_type, time.time_ns(),
                          jsonable(redacted(inputs)), attributes=attributes)
        record.spans.append(span)
        # DSPy calls a span's start and end in the same context: the token resets it there.
        self._open[call_id] = (span, _PARENT.set(span.span_id))

    def _end(self, call_id: str, outputs: Any, exception: BaseException | None) -> SpanRecord | None:
        opened = self._open.pop(call_id, None)
        if opened is None:
            return None
        span, token = opened
        # Ended in another context than it began: the parent is left as it is there.
        with contextlib.suppress(ValueError):
            _PARENT.reset(token)
        span.end_ns = time.time_ns()
        if exception is not None:
            span.error = type(exception).__name__
        else:
            span.outputs = jsonable(outputs)
        return span

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        name = type(instance).__name__
        if name == "ChatProgram":
            # The chat front only maps a conversation onto the program's inputs: the program it runs is the
            # root, so a trace's root holds the program's own inputs (what `traces export` reads).
            self._chat_fronts[call_id] = _RECORD.get()
            return
        if set(inputs) == {"args", "kwargs"} and not inputs["args"]:
            inputs = inputs["kwargs"]  # called with keywords, as programs are: their names are the inputs
        self._start(call_id, f"{name}.forward", "LLM" if name == "Predict" else "CHAIN", inputs)

    def on_module_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        # The run's token usage goes on the root span once the run ends (runtime/run.py): MLflow adds it up
        # as the trace's usage.
        if call_id in self._chat_fronts:
            self._chat_fronts.pop(call_id)
        else:
            self._end(call_id, outputs, exception)

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start(call_id, "LM.__call__", "CHAT_MODEL", inputs,
                    **{LM_MODEL: redacted(str(getattr(instance, "model", "")))})

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        self._end(call_id, outputs, exception)

    def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """A tool the program calls (a ReAct agent's): its name, its arguments, then its observation."""
        if set(inputs) == {"kwargs"}:
            inputs = inputs["kwargs"]  # called with keywords: their names are the tool's arguments
        self._start(call_id, f"Tool.{getattr(instance, 'name', type(instance).__name__)}", "TOOL", inputs)

    def on_tool_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        self._end(call_id, outputs, exception)


# The one recorder: a host adds it to a traced call's DSPy settings (dspy.context), and nowhere else.
RECORDER = RecordingCallback()


def redacted(value: Any, depth: int = 0) -> Any:
    """A call's arguments as a trace may hold them: secret-named keys (api_key, token, authorization, ...)
    dropped at any depth, and credentials taken out of URLs. A key never goes in a trace."""
    if depth > 8:
        return value
    if isinstance(value, dict):
        return {key: redacted(item, depth + 1) for key, item in value.items() if not is_secret_name(str(key))}
    if isinstance(value, (list, tuple)):
        return [redacted(item, depth + 1) for item in value]
    if isinstance(value, str) and "://" in value and len(value) < 2048:
        return clean_url(value)
    return value


def jsonable(value: Any, depth: int = 0) -> Any:
    """A value as plain JSON data, cheaply: texts cut at MAX_TEXT, objects by their fields, else their repr."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "…"
    if depth > 8:
        return "…"
    if isinstance(value, dict):
        return {str(key): jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item, depth + 1) for item in value]
    if hasattr(value, "toDict"):  # dspy.Prediction, dspy.Example
        return jsonable(value.toDict(), depth + 1)
    if hasattr(value, "model_dump"):  # pydantic models, dspy.History
        try:
            return jsonable(value.model_dump(), depth + 1)
        except Exception:
            pass
    if hasattr(value, "__dataclass_fields__"):
        return {name: jsonable(getattr(value, name, None), depth + 1) for name in value.__dataclass_fields__}
    return jsonable(repr(value), depth + 1)
