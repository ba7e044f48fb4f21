"""What the gateway knows about one request, from its arrival to its log line: a `RequestContext`.

It is made when the request arrives (app.Gateway), kept in the ASGI scope under
`CONTEXT_KEY`, filled in as the request goes (the program that answers it, its trace,
its run) and read once its answer has left, for the metrics, the log line and the
trace writer. One typed object instead of a dict every layer writes keys into.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mlflow_dspy.gateway.config import ANONYMOUS
from mlflow_dspy.gateway.feedback_tokens import HEADER, FeedbackTokens
from mlflow_dspy.program.chat import Conversation
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Run
from mlflow_dspy.runtime.trace_record import TraceRecord

CONTEXT_KEY = "mlflow_dspy"
FEEDBACK_TOKEN_HEADER = HEADER.encode()

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(eq=False)  # one per request: compared, and kept in sets, as itself
class RequestContext:
    method: str
    path: str
    headers: dict[bytes, bytes]
    timeout: float  # seconds a run may take (the gateway's --request-timeout)
    session: str | None = None  # the client's x-session-id header: a split's sticky key, the trace's session
    caller: str = ANONYMOUS  # who asks: its API key's name (admission.check_headers)
    tokens: FeedbackTokens | None = None  # with traces on: the answer's feedback token is signed with these
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:16]}")
    started: float = field(default_factory=time.perf_counter)
    status: int = 500  # the answer's, once it starts
    # The program that answers (set by the model's lookup): the name asked for, the version, its split variant.
    model: str | None = None
    version: str = ""
    fingerprint: str = ""
    variant: str | None = None
    trace: TraceRecord | None = None  # recorded when the request is traced
    run: Run | None = None
    holds_slot: bool = False  # counted against the in-flight cap
    responded: bool = False  # its answer has begun (the status line is sent)
    stop_at: float | None = None  # the server is stopping: the loop time by which its run must end
    threads: list[Future] = field(default_factory=list)  # program threads it started (program/work.py)

    @classmethod
    def begin(cls, scope: dict[str, Any], timeout: float) -> RequestContext:
        """The context of a request that just arrived, kept in its scope."""
        headers = dict(scope.get("headers") or ())
        session = headers.get(b"x-session-id")
        ctx = cls(scope.get("method", ""), scope.get("path", ""), headers, timeout,
                  session.decode("latin-1") if session is not None else None)
        scope[CONTEXT_KEY] = ctx
        return ctx

    @classmethod
    def of(cls, request: Request) -> RequestContext:
        return request.scope[CONTEXT_KEY]

    # -- filled in as the request goes ---------------------------------------------
    def served_by(self, host: ProgramHost, name: str, variant: str | None) -> None:
        self.model, self.version, self.fingerprint, self.variant = name, host.version, host.fingerprint, variant

    def start_run(self, host: ProgramHost, call: Conversation | dict[str, Any], *, stream: bool = False,
                  lm_settings: dict[str, Any] | None = None) -> Run:
        """The request's run of `host` (runtime/run.py): within its deadline, recorded in its trace."""
        self.run = Run(host, call, stream=stream, timeout=self.timeout, lm_settings=lm_settings, trace=self.trace)
        if self.stop_at is not None:
            self.run.stop_by(self.stop_at)
        return self.run

    def stop_by(self, when: float) -> None:
        """The server is stopping: the request's run (now or once it starts) must end by loop time `when`."""
        self.stop_at = when
        if self.run is not None:
            self.run.stop_by(when)

    # -- read once the answer has left -------------------------------------------
    @property
    def usage(self) -> tuple[int, int] | None:
        usage = self.run.usage if self.run is not None else None
        return (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None

    @property
    def first_text(self) -> float | None:
        """Seconds from the request to the first streamed text, if any was streamed."""
        first = self.run.first_text if self.run is not None else None
        return first - self.started if first is not None else None

    def stamped(self, send: Send) -> Send:
        """`send`, with the answer's status noted and the headers that name it added: the request id, the
        version that answered, and the trace that holds it (an answer, or a failure the program got as far
        as recording) with the token that lets this caller rate it (gateway/feedback_tokens.py)."""
        async def stamping(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status, self.responded = message["status"], True
                extra = [(b"x-request-id", self.request_id.encode())]
                if self.fingerprint:
                    extra.append((b"x-mlflow-dspy-model-version", self.fingerprint.encode()))
                if self.trace is not None and (self.status < 400 or self.trace.spans):
                    extra.append((b"x-mlflow-trace-id", self.trace.request_id.encode()))
                    if self.tokens is not None and self.model is not None:  # only this caller may rate it
                        token = self.tokens.sign(self.trace.request_id, self.caller, self.model, self.fingerprint)
                        extra.append((FEEDBACK_TOKEN_HEADER, token.encode()))
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        return stamping
