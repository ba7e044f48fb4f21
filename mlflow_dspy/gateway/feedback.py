"""`POST /v1/feedback`: a caller's verdict on an answer it got, recorded as MLflow assessments on its trace.

The answer's `x-mlflow-trace-id` header names the trace, and its `x-mlflow-feedback-token` header is the
caller's right to rate it (gateway/feedback_tokens.py): the post sends it back as the same header, with
the same API key. The body:

    {"trace_id": "tr-...", "value": true | false | number, "rationale": "...", "expected": {"answer": "..."}}

`value` becomes MLflow feedback named `user_feedback` and `expected`, the outputs the answer should have
had, an expectation named `expected_outputs`, both from a HUMAN source whose id is the caller's identity
(its key's name; `anonymous` without keys): a `source` in the body is refused. `traces export` turns them
into data for the next version.

What it takes, each refusal naming its field (400): `value` true, false or a finite number from
-MAX_VALUE to MAX_VALUE; `rationale` up to MAX_RATIONALE characters; `expected` only the program's
output fields, each of its type, nested at most MAX_DEPTH levels (counting `expected` itself), no text
over MAX_TEXT characters, no number that is not finite or an integer beyond MAX_INTEGER. Not JSON: 415
(admission.py).

What it costs the gateway, bounded per worker: per caller, --feedback-rate posts a second in bursts of
--feedback-burst (429 with Retry-After past it); --feedback-in-flight posts writing to the store at once
(429); a write is one request to the store (no look-up of the trace: the token says which program
answered), on threads of its own, within STORE_TIMEOUT seconds, and a store that fails gets 503 with
Retry-After at once for DOWN_PAUSE seconds after. A trace is written a moment after its answer (by the
trace writer): feedback on one not written yet waits for it, WAIT_FOR_WRITE seconds at most, then 404. Any
feedback when tracing is off is a 404.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pydantic import Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.errors import ErrorResponse, GatewayError, invalid_request
from mlflow_dspy.gateway.feedback_tokens import HEADER, FeedbackTokens
from mlflow_dspy.gateway.openai_wire import Strict, shown, unsupported
from mlflow_dspy.internals.mlflow_assessments import bounded_writer
from mlflow_dspy.internals.mlflow_traces import DOWN, REFUSED, failure_kind
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.trace_record import EXPECTATION_NAME, FEEDBACK_NAME

MAX_VALUE = 1_000_000  # wide enough for any rating scale; every store and float holds it
MAX_RATIONALE = 10_000  # characters
MAX_TEXT = 20_000  # characters of a text in `expected` (what a trace keeps of one: runtime/trace_record.py)
MAX_DEPTH = 4  # levels of `expected`: itself, a field's value, and two within it
MAX_VALUES = 1_000  # values (texts, numbers, ...) in `expected`
MAX_INTEGER = 2 ** 53  # beyond it a JSON reader that uses floats (JavaScript, MLflow's UI) loses digits
WAIT_FOR_WRITE = 10.0  # seconds feedback waits for an answer's trace to be written
WAIT_FOR_WRITER = 60.0  # ... once the trace writer has started (MLflow's import: seconds on a busy machine)
STORE_TIMEOUT = 5.0  # seconds an HTTP store has to connect, and as many to answer, one try
DOWN_PAUSE = 2  # seconds after a store failure during which feedback gets 503 at once
TOKEN = HEADER.encode()


class FeedbackRequest(Strict):
    trace_id: str = Field(pattern=r"^tr-[0-9a-f]{32}$", description="the answer's x-mlflow-trace-id header")
    value: StrictBool | StrictInt | StrictFloat = Field(
        description=f"true or false, or a score from -{MAX_VALUE} to {MAX_VALUE}")
    rationale: str | None = Field(default=None, max_length=MAX_RATIONALE)
    expected: dict[str, object] | None = Field(default=None, description="the outputs the answer should have had")

    @model_validator(mode="before")
    @classmethod
    def _no_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" in data:
            raise unsupported("'source' is not accepted: feedback's source is the caller's API key name (or "
                              "'anonymous' without keys), which the gateway sets", "source")
        return data

    @field_validator("value", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        # A 400-digit integer is an int here (and too large for math.isfinite): compared, never converted.
        if isinstance(value, bool) or (isinstance(value, int) and -MAX_VALUE <= value <= MAX_VALUE) or \
                (isinstance(value, float) and math.isfinite(value) and -MAX_VALUE <= value <= MAX_VALUE):
            return value
        raise PydanticCustomError("feedback_value", f"must be true, false or a finite number from -{MAX_VALUE} "
                                                    f"to {MAX_VALUE}")


# /openapi.json: the body is read raw (the caller's rate is checked first), as this model parses it.
FEEDBACK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": FeedbackRequest.model_json_schema()}}}}
FEEDBACK_RESPONSES = {
    200: {"description": "the assessments recorded: {\"trace_id\", \"assessments\": [ids], \"source\"}"},
    403: {"model": ErrorResponse, "description": "no x-mlflow-feedback-token, or not the one this caller got"},
    503: {"model": ErrorResponse, "description": "the tracking store is down or failing (with Retry-After)"}}


class TokenBuckets:
    """Per caller, `rate` posts a second in bursts of up to `burst` (a token bucket each; the callers are the
    configured keys, and `anonymous`: a bounded set)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when counted)

    def take(self, caller: str) -> float:
        """0 if `caller` may post now (and counted); else the seconds until it may."""
        now = time.monotonic()
        tokens, then = self.buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens >= 1:
            self.buckets[caller] = (tokens - 1, now)
            return 0.0
        self.buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate


class FeedbackService:
    def __init__(self, config: GatewayConfig) -> None:
        self.tracing = False  # set once the trace writer runs (`start`)
        self.tokens: FeedbackTokens | None = None
        self.buckets = TokenBuckets(config.feedback_rate, config.feedback_burst)
        self.max_in_flight = config.feedback_in_flight
        self.in_flight = 0
        # Threads of its own: a flood of feedback waits here, not in the pool the programs' threads use.
        self.executor = ThreadPoolExecutor(config.feedback_in_flight, thread_name_prefix="mlflow-dspy-feedback")
        self.write: Callable[[Any], Any] | None = None
        self.down_until = 0.0
        # Blocks (at most its timeout) until the trace writer has started: set by the gateway.
        self.writer_started: Callable[[float], bool] = lambda timeout: True

    def start(self, tracing: bool) -> None:
        """With traces on: the tokens answers carry, and how assessments reach the store. Blocking."""
        self.tracing = tracing
        if not tracing:
            return
        import mlflow

        self.tokens = FeedbackTokens.from_env()
        self.write = bounded_writer(mlflow.get_tracking_uri(), STORE_TIMEOUT) or _log_assessment

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def admit(self, caller: str) -> None:
        """Before the body is read: tracing on (else 404), and the caller within its rate (else 429 with
        Retry-After)."""
        if not self.tracing or self.tokens is None:
            raise GatewayError(404, "tracing is off on this gateway (--no-traces, or its tracking store failed at "
                                    "start-up): there is no trace to give feedback on", "not_found_error",
                               param="trace_id", code="tracing_off")
        wait = self.buckets.take(caller)
        if wait:
            raise GatewayError(429, f"too much feedback from '{caller}': at most {self.buckets.rate:g} a second "
                               f"(bursts of {self.buckets.burst}); retry later", "rate_limit_error",
                               code="feedback_rate_limited", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    async def create(self, ctx: RequestContext, body: FeedbackRequest,
                     host_of: Callable[[str | None, str | None], ProgramHost | None]) -> JSONResponse:
        """Record a verdict from the caller that got the answer; `host_of(version, name)` finds the program
        that answered (to check `expected`'s fields). After `admit`."""
        tokens = self.tokens
        if tokens is None:
            raise GatewayError(404, "tracing is off on this gateway", "not_found_error", code="tracing_off")
        token = ctx.headers.get(TOKEN)
        answered = tokens.check(token.decode("latin-1") if token else None, body.trace_id, ctx.caller)
        if answered is None:
            why = (f"this request has no {HEADER} header: send back the one that came with the answer" if not token
                   else f"the {HEADER} header is not the one this answer gave to '{ctx.caller}': only the "
                        "caller that got an answer may rate it, with the same API key")
            raise GatewayError(403, why, "permission_error", param="trace_id", code="feedback_token_invalid")
        model, version = answered
        if body.expected is not None:
            check_expected(body.expected, host_of(version, model))
        if (left := self.down_until - time.monotonic()) > 0:
            raise _store_down(math.ceil(left))
        if self.in_flight >= self.max_in_flight:
            raise GatewayError(429, f"the server is at its limit of {self.max_in_flight} feedback posts in flight; "
                               "retry later", "rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        source = _source(ctx.caller)
        assessments = [_feedback(body, source)]
        if body.expected is not None:
            assessments.append(_expectation(body, source))
        ids = await self._record(body.trace_id, assessments)
        return JSONResponse({"trace_id": body.trace_id, "assessments": ids, "source": ctx.caller})

    async def _record(self, trace_id: str, assessments: list) -> list[str]:
        """Each assessment in one write; a trace not written yet is waited for (no thread held meanwhile).
        The slot is held until the last write's thread has ended, even if the client left before."""
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        last: Future | None = None
        deadline, pause = time.monotonic() + WAIT_FOR_WRITE, 0.1
        writer_checked = False
        try:
            ids = []
            for assessment in assessments:
                while True:
                    last = self.executor.submit(self.write, assessment)
                    try:
                        ids.append((await asyncio.wrap_future(last)).assessment_id)
                        break
                    except Exception as exc:
                        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                            raise self._failed(exc) from None
                    if not writer_checked:  # a writer still starting has written nothing: wait from its start
                        writer_checked = True
                        if not self.writer_started(0):
                            await asyncio.to_thread(self.writer_started, WAIT_FOR_WRITER)
                            deadline = time.monotonic() + WAIT_FOR_WRITE
                    if time.monotonic() >= deadline:
                        raise GatewayError(404, f"no answer's trace '{shown(trace_id, 200)}' in the tracking store "
                                           f"(waited {WAIT_FOR_WRITE:g} s for it to be written)", "not_found_error",
                                           param="trace_id", code="trace_not_found")
                    pause = min(1.0, pause * 2)  # each try is a write transaction: fewer as the wait goes on
                    await asyncio.sleep(pause)
            return ids
        finally:
            if last is not None and not last.done():
                last.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
            else:
                self._release()

    def _release(self) -> None:
        self.in_flight -= 1

    def _failed(self, exc: Exception) -> GatewayError:
        kind = failure_kind(exc)
        if kind == REFUSED:
            code = getattr(exc, "error_code", None) or type(exc).__name__
            return GatewayError(502, f"the tracking store refused the feedback ({code})", "api_error",
                                code="tracking_store_refused")
        if kind == DOWN:
            self.down_until = time.monotonic() + DOWN_PAUSE
        return _store_down(DOWN_PAUSE)


def _store_down(retry_after: int) -> GatewayError:
    return GatewayError(503, "the tracking store did not take the feedback (down or failing); retry later",
                        "service_unavailable", code="tracking_store_unavailable",
                        headers={"Retry-After": str(retry_after)})


def _log_assessment(assessment: Any) -> Any:
    """Any store but an HTTP one: MLflow's public API (which does not retry)."""
    import mlflow

    return mlflow.log_assessment(assessment.trace_id, assessment)


def _source(caller: str) -> Any:
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    return AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=caller)


def _feedback(body: FeedbackRequest, source: Any) -> Any:
    from mlflow.entities import Feedback

    return Feedback(name=FEEDBACK_NAME, value=body.value, rationale=body.rationale, source=source,
                    trace_id=body.trace_id)


def _expectation(body: FeedbackRequest, source: Any) -> Any:
    from mlflow.entities import Expectation

    return Expectation(name=EXPECTATION_NAME, value=body.expected, source=source, trace_id=body.trace_id)


# -- what `expected` may hold ------------------------------------------------------------------------------------
def check_expected(expected: dict[str, object], host: ProgramHost | None) -> None:
    """Bounded in depth, size and numbers; the program's own output fields, each of its type (when the version
    that answered is served here: otherwise its fields are not known, and only the bounds apply)."""
    if not expected:
        raise invalid_request("'expected' is empty: give the outputs the answer should have had", param="expected")
    _check_bounds(expected, "expected", 1, [0])
    if host is None:
        return
    outputs = {field.name: field for field in host.program.mapping.outputs}
    for name, value in expected.items():
        field = outputs.get(name)
        if field is None:
            raise invalid_request(f"'expected' names '{shown(name, 200)}', which is not an output of this program; "
                                  f"its outputs are {', '.join(outputs)}", param=f"expected.{shown(name, 200)}")
        problem = _type_problem(field.annotation, value)
        if problem:
            raise invalid_request(f"'expected.{name}' is not a {field.type_name()}, the type of the program's "
                                  f"output '{name}' ({problem})", param=f"expected.{name}")


def _check_bounds(value: Any, where: str, depth: int, count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise invalid_request(f"'expected' holds more than {MAX_VALUES} values", param="expected")
    if isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            raise invalid_request(f"'{where}' nests deeper than {MAX_DEPTH} levels (counting 'expected')", param=where)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and len(key) > 200:
                raise invalid_request(f"'{where}' has a key of more than 200 characters", param=where)
            inner = f"{where}.{shown(key, 200)}" if isinstance(value, dict) else f"{where}[{key}]"
            _check_bounds(item, inner, depth + 1, count)
    elif isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise invalid_request(f"'{where}' is longer than {MAX_TEXT} characters", param=where)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
        raise invalid_request(f"'{where}' is an integer beyond ±2**53", param=where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise invalid_request(f"'{where}' is not a finite number", param=where)


def _type_problem(annotation: Any, value: Any) -> str | None:
    """Why `value` (as JSON gave it) is not of `annotation`, strictly (a number is not a text); None if it is,
    or if the type is not one pydantic can check."""
    from pydantic import ValidationError

    try:
        adapter = _adapter(annotation)
    except TypeError:  # not hashable: built each time
        adapter = _adapter.__wrapped__(annotation)
    if adapter is None:
        return None
    try:
        adapter.validate_json(json.dumps(value), strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        return first.get("msg", "invalid")
    except Exception:
        return None
    return None


@functools.lru_cache(maxsize=256)
def _adapter(annotation: Any) -> Any:
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(annotation)
    except Exception:
        return None
