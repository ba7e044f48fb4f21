"""The raw LM chunks of `dspy.streamify` still carry what internals/dspy_stream.py reads: their text, the
predictor whose LM call sent them, and which call it was. A program with two predictors streams only the
answer's predictor, and a second call of it (a retry) starts its text afresh."""

from __future__ import annotations

import asyncio

import dspy
from dspy.clients.engines.streaming import ListenerBridge
from dspy.lm15 import (
    Message,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

from mlflow_dspy.internals.dspy_stream import chunk_call, chunk_predictor, chunk_text
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost


class ScriptedEngine:
    """A sync engine (DSPy requires one): each call answers the next scripted text."""

    supports_response_schema = False
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"temperature", "max_tokens", "stream"})

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def next(self) -> str:
        self.calls += 1
        return self.answers.pop(0)

    def complete(self, request) -> Response:
        return Response(id="c", model="scripted", message=Message.assistant([TextPart(self.next())]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

    def stream(self, request):
        raise AssertionError("the async engine streams")

    def close(self) -> None:
        pass


class AsyncScriptedEngine:
    """The streaming engine: each call's text in small chunks, as an LM streams it."""

    supports_response_schema = False
    supports_function_calling = False
    supports_reasoning = False
    supported_params = ScriptedEngine.supported_params

    def __init__(self, sync: ScriptedEngine) -> None:
        self.sync = sync

    async def complete(self, request) -> Response:
        return self.sync.complete(request)

    async def stream(self, request):
        text = self.sync.next()
        calls = self.sync.calls
        yield StreamStartEvent(id=f"call-{calls}", model="scripted")
        for start in range(0, len(text), 4):
            await asyncio.sleep(0)
            yield StreamDeltaEvent(delta=TextDelta(text=text[start:start + 4]))
        yield StreamEndEvent(finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

    async def aclose(self) -> None:
        pass


class Drafted(dspy.Module):
    """Two predictors: a draft, then the answer from it. Only the answer's text is the chat's content."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question: str):
        return self.answer(question=question, draft=self.draft(question=question).draft)

    async def aforward(self, question: str):
        draft = await self.draft.acall(question=question)
        return await self.answer.acall(question=question, draft=draft.draft)


def scripted_lm(*answers: str) -> dspy.LM:
    engine = ScriptedEngine(list(answers))
    return dspy.LM("openai/scripted", engine=engine, async_engine=AsyncScriptedEngine(engine), cache=False)


def test_a_chunk_built_the_way_dspy_builds_it_gives_its_text_predictor_and_call():
    bridge = ListenerBridge("scripted", predict_id=12345)
    assert bridge.chunk(StreamStartEvent(id="call-7", model="scripted")) is None
    chunk = bridge.chunk(StreamDeltaEvent(delta=TextDelta(text="Hello")))
    assert chunk_text(chunk) == "Hello", "DSPy's stream chunk no longer has choices[0].delta.content"
    assert chunk_predictor(chunk, default=0) == 12345, "DSPy's stream chunk no longer carries predict_id"
    assert chunk_call(chunk) == "call-7", "DSPy's stream chunk no longer carries its LM call's id"
    assert chunk_text(object()) is None and chunk_predictor(object(), default=9) == 9


async def test_a_two_predictor_program_streams_only_the_answers_predictor():
    lm = scripted_lm("[[ ## draft ## ]]\nDRAFT SHOULD NOT SHOW\n\n[[ ## completed ## ]]",
                     "[[ ## answer ## ]]\nThe final answer.\n\n[[ ## completed ## ]]")
    host = ProgramHost(ChatProgram(Drafted()), lm, dspy.ChatAdapter(), "drafted", "test")
    items = [item async for item in host.stream([{"role": "user", "content": "Why?"}])]
    texts = [item for item in items if isinstance(item, tuple)]
    assert "".join(text for label, text in texts if label == "content") == "The final answer."
    assert not any("DRAFT" in text for _, text in texts)
    assert len(texts) > 2, "the answer arrived whole, not as the LM streamed it"
    assert items[-1].answer == "The final answer."


async def test_a_second_call_of_the_answers_predictor_streams_on_where_it_extends_the_first():
    """BestOfN/Refine call the same predictor again: its text is parsed afresh (a new call id), and what was
    already sent is not sent twice."""

    class Twice(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.answer = dspy.Predict("question -> answer")

        async def aforward(self, question: str):
            await self.answer.acall(question=question)
            return await self.answer.acall(question=question)

    lm = scripted_lm("[[ ## answer ## ]]\nSecond\n\n[[ ## completed ## ]]",
                     "[[ ## answer ## ]]\nSecond try, longer.\n\n[[ ## completed ## ]]")
    host = ProgramHost(ChatProgram(Twice()), lm, dspy.ChatAdapter(), "twice", "test")
    items = [item async for item in host.stream([{"role": "user", "content": "Why?"}])]
    content = "".join(text for item in items if isinstance(item, tuple) for label, text in [item]
                      if label == "content")
    assert content == "Second try, longer."
