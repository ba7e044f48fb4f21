"""Load a chat program once, then run it per request: natively async, with
per-request LM settings in a `dspy.context` (never `dspy.configure` in a
handler), and token streaming. What a request's run adds around it (its
deadline, an answer cut short, its usage) is `runtime/run.py`'s."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, contextmanager
from typing import Any

import dspy
from dspy.streaming import StatusMessage, StatusMessageProvider

from mlflow_dspy.internals.dspy_chat_adapter import serving_adapter
from mlflow_dspy.internals.dspy_stream import chunk_call, chunk_predictor, chunk_text
from mlflow_dspy.program.chat import ChatProgram, Conversation, call_async
from mlflow_dspy.runtime.field_stream import FieldStream
from mlflow_dspy.runtime.trace_record import RECORDER, TraceRecord, recording


def as_text(value: Any) -> str:
    """Chat content is text: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, default=str)


class ProgramHost:
    """One loaded chat program and the DSPy settings it runs with."""

    def __init__(self, program: ChatProgram, lm: dspy.BaseLM, adapter: Any, name: str, source: str,
                 version: str = "") -> None:
        self.program = program
        self.version = version  # the registered version (or run) it came from: "" when served from code
        # What every answer names as its source (system_fingerprint, x-mlflow-dspy-model-version).
        self.fingerprint = source
        # A request it must answer before it takes traffic after a reload (its logged input example).
        self.example: list[dict] = [{"role": "user", "content": "Hello"}]
        self.lm = lm
        self.adapter = serving_adapter(adapter)
        self.name = name
        self.source = source
        self.created = int(time.time())
        self._releases: list[Callable[[], None]] = []  # what to let go when it is no longer served
        self.files: str | None = None  # the folder its model was loaded from (a verified private copy), if any

    def on_release(self, release: Callable[[], None]) -> None:
        """Call `release` when this host is no longer served (its model's private copy, say)."""
        self._releases.append(release)

    def release(self) -> None:
        """No longer served (a hot reload replaced it): what it holds is let go; requests still running on it
        keep the loaded program."""
        while self._releases:
            self._releases.pop()()

    # -- loading ---------------------------------------------------------------
    @classmethod
    def from_program(cls, program: str, lm_model: str | None = None, name: str | None = None) -> ProgramHost:
        """A program served straight from its code: an example, a project's program or a reference."""
        from mlflow_dspy.lm_engine.select import adapter_for, build_lm
        from mlflow_dspy.program.target import open_target

        target = open_target(program)
        lm = build_lm(lm_model or target.config.lm)
        # Served under the name a logged version of it gets (dspy-<name> unless configured).
        host = cls(target.chat(), lm, adapter_for(lm), name or target.config.model_name, f"program:{program}")
        host.example = [{"role": "user", "content": target.input_example()}]
        return host

    def warm_up(self) -> None:
        """Load the embedded model now, so /ready means a request is answered at full speed."""
        from mlflow_dspy.lm_engine.llama_engine import LlamaCppEngine, embedded_runtime

        engine = getattr(self.lm, "engine", None)
        if isinstance(engine, LlamaCppEngine):
            embedded_runtime(engine.n_ctx)

    # -- running ---------------------------------------------------------------
    @contextmanager
    def context(self, lm_settings: dict[str, Any] | None = None, trace: TraceRecord | None = None):
        """DSPy's settings for one call; with `trace`, the calls are recorded into it (runtime/trace_record.py)."""
        lm = self.lm.copy(**lm_settings) if lm_settings else self.lm
        traced = {}
        if trace is not None and RECORDER not in dspy.settings.callbacks:
            traced["callbacks"] = [*dspy.settings.callbacks, RECORDER]
        # No call history in a server: it would keep every conversation in
        # memory (up to 10,000 per LM) for nobody to read.
        with dspy.context(lm=lm, adapter=self.adapter, track_usage=True, disable_history=True, **traced), \
                recording(trace):
            yield

    async def answer(self, messages: list[dict] | Conversation, lm_settings: dict[str, Any] | None = None,
                     trace: TraceRecord | None = None) -> dspy.Prediction:
        with self.context(lm_settings, trace):
            return answered(await self.program.acall(messages=messages), trace)

    async def predict(self, inputs: dict[str, Any], trace: TraceRecord | None = None) -> dspy.Prediction:
        """The typed /predict: the inner program, called with its input fields."""
        with self.context(None, trace):
            return answered(await call_async(self.program.for_call(), inputs), trace)

    def content(self, prediction: dspy.Prediction) -> str:
        """The chat answer: one answer field as its text, several as one JSON object."""
        fields = self.program.answer_fields
        if len(fields) == 1:
            return as_text(prediction.get(fields[0], ""))
        return as_text({name: prediction.get(name) for name in fields})

    def reasoning(self, prediction: dspy.Prediction) -> str | None:
        value = prediction.get("reasoning")
        return as_text(value) if value is not None else None

    async def stream(
        self, messages: list[dict] | Conversation, lm_settings: dict[str, Any] | None = None,
        trace: TraceRecord | None = None,
    ) -> AsyncIterator[tuple[str, str] | dspy.Prediction]:
        """Yield ("content" | "reasoning", text) as the LM writes the answer and the reasoning, then the final
        Prediction."""
        program, kwargs = self.program.prepare(messages)
        fields = {"reasoning": "reasoning"}
        if self.program.streams_answer:
            fields[self.program.answer_fields[0]] = "content"
        async for item in self._stream(program, kwargs, lm_settings, fields, trace):
            if isinstance(item, dspy.Prediction) and not self.program.streams_answer:
                # Typed or composite answers are whole only at the end.
                yield "content", self.content(item)
            yield item

    async def predict_stream(self, inputs: dict[str, Any], trace: TraceRecord | None = None
                             ) -> AsyncIterator[tuple[str, str] | dspy.Prediction]:
        """The tutorial's /predict/stream: (output field, text) for every output field, then the Prediction."""
        program = self.program.for_call()
        fields = {name: name for name in _target(program, self.program.answer_fields[0]).signature.output_fields}
        async for item in self._stream(program, inputs, None, fields, trace):
            yield item

    async def _stream(
        self, program: dspy.Module, kwargs: dict[str, Any], lm_settings: dict[str, Any] | None,
        fields: dict[str, str], trace: TraceRecord | None = None,
    ) -> AsyncIterator[tuple[str, str] | dspy.Prediction]:
        target = id(_target(program, self.program.answer_fields[0]))
        decoder = FieldStream(list(fields))  # fresh per request: it keeps state
        final, call_id = None, None
        # aclosing: the streamify generator is always finished in this task,
        # even when the client goes away (its task group must exit where it began).
        with self.context(lm_settings, trace):
            # Made inside the context: streamify keeps the callbacks (the trace recorder) it finds.
            streaming = _streaming(program, trace)
            async with aclosing(streaming(**kwargs)) as values:
                async for value in values:
                    if isinstance(value, dspy.Prediction):
                        final = value
                        continue
                    if isinstance(value, StatusMessage):  # a tool starting or ending (ToolSteps)
                        yield "step", value.message
                        continue
                    text = chunk_text(value)
                    if text and chunk_predictor(value, target) == target:
                        if chunk_call(value) != call_id:
                            call_id = chunk_call(value)
                            decoder.new_call()
                        for field, delta in decoder.feed(text):
                            yield fields[field], delta
        if final is not None:
            for field, label in fields.items():
                rest = decoder.finish(field, as_text(final.get(field, "")))
                if rest:
                    yield label, rest
            yield final


def _streaming(program: dspy.Module, trace: TraceRecord | None):
    """Natively async when the program can be (no thread per stream): the LM's own stream reaches the client
    as it arrives, and a client that leaves cancels the LM call with this task. A module with only a forward
    runs on a program thread, whose work is tracked if the client leaves. Either way, what it returns must be
    a prediction: `dspy.streamify` would wait for one forever."""

    async def checked(**arguments: Any) -> dspy.Prediction:
        return answered(await call_async(program, arguments), trace)

    return dspy.streamify(checked, status_message_provider=ToolSteps(),
                          include_final_prediction_in_output_stream=True)


class ToolSteps(StatusMessageProvider):
    """The tools a program calls (a ReAct agent's), told as they run through DSPy's status messages: a JSON
    object for each tool that starts (`tool`, `arguments`) and ends (`output`); nothing for anything else."""

    def tool_start_status_message(self, instance: Any, inputs: dict[str, Any]) -> str:
        arguments = inputs.get("kwargs", inputs) if isinstance(inputs, dict) else inputs
        return json.dumps({"tool": getattr(instance, "name", "tool"), "arguments": arguments}, default=str)

    def tool_end_status_message(self, outputs: Any) -> str:
        return json.dumps({"output": as_text(outputs)})

    def lm_start_status_message(self, instance: Any, inputs: dict[str, Any]) -> None:
        return None

    def lm_end_status_message(self, outputs: Any) -> None:
        return None


class NoPrediction(RuntimeError):
    """A program that returned something other than a prediction: BestOfN and Refine return None when every
    attempt failed."""


def answered(result: Any, trace: TraceRecord | None = None) -> dspy.Prediction:
    """The program's prediction; NoPrediction, naming the last failure the trace saw, when there is none."""
    if isinstance(result, dspy.Prediction):
        return result
    failed = [span for span in (trace.spans if trace is not None else []) if span.error]
    why = f"; the last attempt failed with {failed[-1].error}" if failed else ""
    raise NoPrediction(f"the program returned {type(result).__name__} instead of a prediction (BestOfN and Refine "
                       f"do when every attempt failed){why}")


def _target(program: dspy.Module, answer_field: str) -> dspy.Predict:
    """The predictor that writes the answer: its tokens are the ones streamed."""
    writers = [p for p in program.predictors() if answer_field in p.signature.output_fields]
    return (writers or program.predictors())[-1]
