"""One program run for one request, whatever protocol asked for it: a stream of events.

A protocol (chat completions, Responses, /predict, /invocations) says what to run: a
`Conversation` for the chat program, or a dict of the program's own input fields. It
says how: streamed or not, with the client's LM settings. Then it reads back one stream:

- `Delta(field, text)`: text as the LM writes it (streamed runs only). A chat run's
  fields are "content" (the answer) and "reasoning"; a fields run's are the output fields' names.
- `ToolStep(name, arguments, output)`: a tool the program called (a ReAct agent's), once it has
  returned (streamed runs; a finished run's are `tool_steps(prediction)`).
- `Finished(prediction, finish_reason, usage)`: the answer. `cut_short` says the client's
  own limit (max_tokens, stop) cut the outputs before they parsed; the prediction then holds what the
  LM wrote of them, as OpenAI answers such a request (a 200, finish_reason "length").
- `Failed(failure)`: what went wrong, as a status, a message and a code, never a traceback.

A server that stops gives its runs until a time (`stop_by`): one still running then ends as `Failed`
with `STOPPING` (a 503 that says so), its program cancelled as a client that leaves cancels it.

The run owns what every protocol needs around a program: the deadline, the recovery of an
answer cut short, its finish_reason, the time of the first text and the token usage. The
protocols only encode the events (streamed, or collected with `outcome()`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import dspy
from dspy.utils.exceptions import AdapterParseError
from pydantic import BaseModel, ConfigDict, computed_field

from mlflow_dspy.internals.mlflow_traces import TOKEN_USAGE
from mlflow_dspy.lm_engine.deadline import Deadline, within
from mlflow_dspy.lm_engine.finishes import finish_reasons
from mlflow_dspy.program.chat import ChatInputError, Conversation
from mlflow_dspy.program.failures import Failure, failure_of
from mlflow_dspy.runtime.field_stream import FieldStream
from mlflow_dspy.runtime.host import NoPrediction, ProgramHost
from mlflow_dspy.runtime.trace_record import TraceRecord

log = logging.getLogger("mlflow_dspy.runtime")

FinishReason = Literal["stop", "length"]
# The client's own settings that can cut an answer short.
LIMITING_SETTINGS = ("max_tokens", "stop")
# A run the server's graceful stop ended (its --graceful-timeout passed first): any protocol's error.
STOPPING = Failure(503, "the server is stopping and this answer did not finish within its graceful timeout; "
                        "send the request again", "service_unavailable", "server_shutting_down", retry_after=1)


class Usage(BaseModel):
    """The tokens a run's LM calls took, added up over every call (the one usage type; OpenAI's own shape)."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @computed_field
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, by_model: dict[str, dict[str, Any]] | None) -> Usage:
        """The usage DSPy counts by LM (`get_total_tokens()` of its usage tracker), added up."""
        counts = list((by_model or {}).values())
        return cls(prompt_tokens=sum(int(c.get("prompt_tokens") or 0) for c in counts),
                   completion_tokens=sum(int(c.get("completion_tokens") or 0) for c in counts))

    def for_trace(self) -> dict[str, int]:
        return {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Delta:
    field: str
    text: str


@dataclass(frozen=True)
class ToolStep:
    """A tool the program called (a ReAct agent's): its name, its arguments and what it returned."""

    name: str
    arguments: dict[str, Any]
    output: str


@dataclass(frozen=True)
class Finished:
    prediction: dspy.Prediction
    finish_reason: FinishReason = "stop"
    usage: Usage = field(default_factory=Usage)
    cut_short: bool = False


@dataclass(frozen=True)
class Failed:
    failure: Failure


Event = Delta | ToolStep | Finished | Failed


def tool_steps(prediction: dspy.Prediction) -> list[ToolStep]:
    """The tools a finished program called, from a ReAct agent's `trajectory` (`tool_name_i`, `tool_args_i`,
    `observation_i`); its closing `finish` is not a tool."""
    trajectory = prediction.get("trajectory") if isinstance(prediction, dspy.Prediction) else None
    steps, i = [], 0
    while isinstance(trajectory, dict) and f"tool_name_{i}" in trajectory:
        name = trajectory[f"tool_name_{i}"]
        if name != "finish":
            arguments = trajectory.get(f"tool_args_{i}")
            steps.append(ToolStep(str(name), arguments if isinstance(arguments, dict) else {},
                                  str(trajectory.get(f"observation_{i}", ""))))
        i += 1
    return steps


def failure(exc: BaseException) -> Failure:
    """What a failed run means to a client; anything unexpected is a bare 500, its details in the log. A
    failure on the server's or the LM's side is logged with its cause."""
    if isinstance(exc, ChatInputError):
        return Failure(400, exc.message, "invalid_request_error", "invalid_messages", param="messages")
    if isinstance(exc, NoPrediction):
        known = Failure(502, str(exc), "upstream_error", "no_prediction")
    else:
        known = failure_of(exc)
    if known is None:
        log.error("unexpected failure while answering", exc_info=exc)
        return Failure(500, "internal error", "server_error", "internal_error")
    if known.status >= 500:
        log.warning("a run failed (%s %s): %s: %s", known.status, known.code, type(exc).__name__, str(exc)[:500])
    return known


def truncated(lm_settings: dict[str, Any]) -> Failure:
    """The refusal of an answer cut short, for a protocol that cannot answer with part of one (/invocations)."""
    limits = {k: v for k, v in lm_settings.items() if k in LIMITING_SETTINGS}
    shown = ", ".join(f"{k}={v!r}" for k, v in limits.items())
    return Failure(400, f"the answer was cut short ({shown}) before the program's outputs were complete; "
                        "allow a longer answer", "invalid_request_error", "answer_truncated", param=next(iter(limits)))


class Run:
    """One request's run of `host`: on a `Conversation` (the chat program) or on a dict of the program's
    own inputs, within `timeout` seconds, streamed or not."""

    def __init__(self, host: ProgramHost, call: Conversation | dict[str, Any], *, stream: bool, timeout: float,
                 lm_settings: dict[str, Any] | None = None, trace: TraceRecord | None = None) -> None:
        self.host = host
        self.call = call
        self.stream = stream
        self.timeout = timeout
        self.lm_settings = lm_settings or {}
        self.trace = trace
        self.first_text: float | None = None  # time.perf_counter() when the first Delta left
        self.usage: Usage | None = None  # once finished
        # Every LM call of the run counted here, whether the run ends with an answer or not (an answer cut
        # short has used tokens too): DSPy's own usage tracker (`dspy.track_usage`), one per run.
        self._tracker: Any = None
        self._finishes: list[str] = []  # why each LM call ended, as our engines saw it (lm_engine/finishes.py)
        self._deadline: Deadline | None = None  # once it runs: its --request-timeout, or the stop's, if earlier
        self._stop_at: float | None = None

    def stop_by(self, when: float) -> None:
        """The server is stopping: end by loop time `when` (a run still going then fails with STOPPING)."""
        self._stop_at = when if self._stop_at is None else min(self._stop_at, when)
        if self._deadline is not None:
            self._deadline.bring_forward(when)

    def _start_clock(self) -> Deadline:
        self._deadline = Deadline(asyncio.get_running_loop().time() + self.timeout)
        if self._stop_at is not None:
            self._deadline.bring_forward(self._stop_at)
        return self._deadline

    @property
    def chat(self) -> bool:
        return isinstance(self.call, Conversation)

    async def events(self) -> AsyncIterator[Event]:
        """The run's events: Deltas (streamed runs), then one Finished or Failed."""
        if self.stream:
            async for event in self._streamed():
                yield event
        else:
            yield await self._whole()

    async def outcome(self) -> Finished | Failed:
        """The run collected: its Finished or Failed (a streamed run's Deltas and steps are dropped)."""
        if not self.stream:
            return await self._whole()
        last: Finished | Failed | None = None
        async for event in self._streamed():
            if isinstance(event, Finished | Failed):
                last = event
        assert last is not None
        return last

    # -- the two ways to run ---------------------------------------------------
    async def _whole(self) -> Finished | Failed:
        host = self.host
        with dspy.track_usage() as self._tracker, finish_reasons() as self._finishes:
            try:
                async with self._start_clock().waiting():
                    if self.chat:
                        prediction = await host.answer(self.call, self.lm_settings, self.trace)
                    else:
                        prediction = await host.predict(self.call, self.trace)
            except Exception as exc:
                return self._ended(exc)
        return self._finished(prediction)

    async def _streamed(self) -> AsyncIterator[Event]:
        with dspy.track_usage() as self._tracker, finish_reasons() as self._finishes:
            async for event in self._streamed_events():
                yield event

    async def _streamed_events(self) -> AsyncIterator[Event]:
        host, sent = self.host, {}
        if self.chat:
            produced = host.stream(self.call, self.lm_settings, self.trace)
        else:
            produced = host.predict_stream(self.call, self.trace)
        prediction, tool = None, None
        try:
            async for item in within(produced, self._start_clock()):
                if isinstance(item, dspy.Prediction):
                    prediction = item
                    continue
                label, text = item
                if label == "step":  # a tool started (its name and arguments) or ended (its output)
                    step = json.loads(text)
                    if "tool" in step:
                        tool = step
                    elif tool is not None:
                        yield ToolStep(tool["tool"], tool.get("arguments") or {}, step.get("output", ""))
                        tool = None
                    continue
                sent[label] = sent.get(label, "") + text
                yield self._delta(label, text)
        except Exception as exc:
            end = self._ended(exc)
            if isinstance(end, Finished):  # cut short: the rest of what the LM wrote of each text
                for label, text in self._texts(end.prediction).items():
                    already = sent.get(label, "")
                    if text.startswith(already) and len(text) > len(already):
                        yield self._delta(label, text[len(already):])
            yield end
            return
        yield self._finished(prediction)

    # -- what the events say ---------------------------------------------------
    def _delta(self, label: str, text: str) -> Delta:
        if self.first_text is None:
            self.first_text = time.perf_counter()
        return Delta(label, text)

    def _finished(self, prediction: dspy.Prediction | None, cut_short: FinishReason | None = None) -> Finished:
        prediction = prediction if prediction is not None else dspy.Prediction()
        self.usage = Usage.of(self._tracker.get_total_tokens() if self._tracker is not None else None)
        if self.usage.total_tokens and self.trace is not None and self.trace.spans:
            self.trace.spans[0].attributes[TOKEN_USAGE] = self.usage.for_trace()  # the trace's usage, on its root
        reason = cut_short or self._finish_reason()
        return Finished(prediction, reason, self.usage, cut_short=cut_short is not None)

    def _ended(self, exc: Exception) -> Finished | Failed:
        """A run that raised: an answer the client's own limit cut short, else a failure (STOPPING, however the
        program took its cancellation, once the stop's deadline has passed)."""
        deadline = self._deadline
        if deadline is not None and deadline.moved and asyncio.get_running_loop().time() >= deadline.when:
            self.usage = Usage.of(self._tracker.get_total_tokens() if self._tracker is not None else None)
            return Failed(STOPPING)
        reason = self._cut_short(exc)
        if reason is None:
            self.usage = Usage.of(self._tracker.get_total_tokens() if self._tracker is not None else None)
            return Failed(failure(exc))
        return self._finished(dspy.Prediction(**_partial_outputs(exc)), cut_short=reason)

    def _cut_short(self, exc: BaseException) -> FinishReason | None:
        """When the client limited the answer (max_tokens, stop) and the outputs then failed to parse, the
        limit cut them short: the finish_reason that says so. None for any other failure."""
        if not isinstance(exc, AdapterParseError):
            return None
        if "max_tokens" in self.lm_settings:
            return "length"
        return "stop" if "stop" in self.lm_settings else None

    def _finish_reason(self) -> FinishReason:
        """"length" when an LM call of the run was cut (its answer parsed all the same), else "stop". For an
        LM our engines do not run, a guess: a one-call program's LM wrote all the tokens the client allowed."""
        if self._finishes:
            return "length" if "length" in self._finishes else "stop"
        limit = self.lm_settings.get("max_tokens")
        if limit is None or len(self.host.program.program.predictors()) != 1:
            return "stop"
        return "length" if self.usage.completion_tokens >= limit else "stop"

    def _texts(self, prediction: dspy.Prediction) -> dict[str, str]:
        """The streamed texts a prediction holds, by label (only a chat run takes the client's limits)."""
        return {"reasoning": self.host.reasoning(prediction) or "", "content": self.host.content(prediction)}


def _partial_outputs(exc: AdapterParseError) -> dict[str, str]:
    """The output fields an LM answer cut short holds so far (ChatAdapter markers or JSON), by name."""
    stream = FieldStream(list(exc.signature.output_fields))
    stream.feed(exc.lm_response or "")
    return {name: text for name, text in stream.sent.items() if text}
