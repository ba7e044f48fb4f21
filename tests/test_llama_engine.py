"""The embedded SmolLM2 engine, run for real (no mocks): structured answers
parse, tokens stream, calls are serialized, and pickles carry no path."""

import asyncio
import pickle
import threading

import cloudpickle
import dspy
import pytest
from dspy.lm15 import Config, Message, Request

from mlflow_dspy.lm_engine import EMBEDDED_MODEL, AsyncLlamaCppEngine, LlamaCppEngine, build_lm
from mlflow_dspy.lm_engine.gguf import GGUF_FILE, locate_gguf
from mlflow_dspy.lm_engine.select import adapter_for

SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["reasoning", "answer"],
}


def request(text: str, **config) -> Request:
    return Request(model=EMBEDDED_MODEL, messages=(Message.user(text),), config=Config(**config))


@pytest.fixture(scope="module")
def engine():
    return LlamaCppEngine()


def test_gguf_is_found_inside_the_installed_wheel():
    path = locate_gguf()
    assert path.name == GGUF_FILE
    assert "site-packages" in str(path)
    assert path.stat().st_size > 50_000_000


@pytest.mark.embedded
def test_schema_constrained_output_is_json_of_that_schema(engine):
    import json

    response = engine.complete(
        request("What is the capital of France?", max_tokens=200,
                response_format={"type": "json_schema", "schema": SCHEMA, "name": "out"})
    )
    data = json.loads(response.message.parts[0].text)
    assert set(data) == {"reasoning", "answer"}
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


@pytest.mark.embedded
def test_stream_yields_tokens_that_join_to_the_complete_answer(engine):
    req = request("Name three colors.", max_tokens=40, temperature=0.0)
    events = list(engine.stream(req))
    deltas = [e.delta.text for e in events if e.type == "delta"]
    assert events[0].type == "start"
    assert events[-1].type == "end"
    assert len(deltas) > 3
    assert "".join(deltas) == engine.complete(req).message.parts[0].text
    assert events[-1].usage.output_tokens == len(deltas)


@pytest.mark.embedded
def test_max_tokens_is_honoured_and_reported_as_length(engine):
    response = engine.complete(request("Write a long story about a dragon.", max_tokens=5))
    assert response.usage.output_tokens <= 5
    assert response.finish_reason == "length"


@pytest.mark.embedded
def test_chain_of_thought_answers_through_dspy_with_the_json_adapter():
    lm = build_lm()
    assert lm.supports_response_schema
    with dspy.context(lm=lm, adapter=adapter_for(lm)):
        prediction = dspy.ChainOfThought("question -> answer")(question="What is 2 + 2?")
    assert isinstance(prediction.answer, str) and prediction.answer.strip()
    assert isinstance(prediction.reasoning, str)
    # Usage reached DSPy's history: the engine reports real token counts.
    assert lm.history[-1]["usage"]["prompt_tokens"] > 50


@pytest.mark.embedded
def test_concurrent_calls_are_serialized_and_all_answered(engine):
    results: list[str] = []
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            results.append(engine.complete(request(f"Say the number {i}.", max_tokens=8)).message.parts[0].text)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 6


@pytest.mark.embedded
async def test_async_engine_streams_and_completes(engine):
    async_engine = AsyncLlamaCppEngine(engine)
    req = request("Name a fruit.", max_tokens=12)
    deltas = [e.delta.text async for e in async_engine.stream(req) if e.type == "delta"]
    response = await async_engine.complete(req)
    assert deltas and "".join(deltas) == response.message.parts[0].text


@pytest.mark.embedded
async def test_cancelling_an_async_call_frees_the_model(engine):
    async_engine = AsyncLlamaCppEngine(engine)
    task = asyncio.create_task(async_engine.complete(request("Write a very long essay.", max_tokens=400)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next call gets the lock promptly: the cancelled generation stopped.
    response = await asyncio.wait_for(async_engine.complete(request("Say hi.", max_tokens=4)), timeout=30)
    assert response.usage.output_tokens <= 4


@pytest.mark.embedded
def test_lm_pickles_without_handle_lock_or_model_path():
    lm = build_lm()
    with dspy.context(lm=lm, adapter=adapter_for(lm)):
        dspy.Predict("question -> answer")(question="hi")  # loads the model into the process
    lm.history.clear()
    blob = cloudpickle.dumps(lm)
    assert str(locate_gguf()).encode() not in blob
    assert b".gguf" not in blob
    restored = pickle.loads(blob)
    with dspy.context(lm=restored, adapter=adapter_for(restored)):
        assert dspy.Predict("question -> answer")(question="What is 1 + 1?").answer


def test_lm_state_round_trips_through_dspy_save_format():
    state = build_lm().dump_state()
    assert state["engine"]["class"] == "mlflow_dspy.lm_engine.llama_engine:LlamaCppEngine"
    restored = dspy.LM.load_state(state, allow_custom_lm_class=True)
    assert isinstance(restored.engine, LlamaCppEngine)
    assert restored.model == EMBEDDED_MODEL


@pytest.mark.embedded
def test_same_request_same_answer_at_temperature_zero(engine):
    req = request("Write one sentence about the sea.", max_tokens=60, temperature=0.0)
    other = request("What is 2 + 2?", max_tokens=10, temperature=0.0)
    first = engine.complete(req).message.parts[0].text
    engine.complete(other)  # a different prompt in between must not change the next answer
    assert [engine.complete(req).message.parts[0].text for _ in range(2)] == [first, first]


@pytest.mark.embedded
async def test_queued_generations_do_not_hold_the_event_loops_threads(engine):
    async_engine = AsyncLlamaCppEngine(engine)
    await async_engine.complete(request("Say hi.", max_tokens=2))  # the model and its batch thread are up
    threads_before = set(threading.enumerate())
    # More waiting generations than the default pool has threads (6 on 2 cores).
    tasks = [asyncio.create_task(async_engine.complete(request(f"Count to {i}0.", max_tokens=60))) for i in range(8)]
    await asyncio.sleep(0.1)
    # No thread is parked per request: the batch thread serves them all.
    assert set(threading.enumerate()) <= threads_before
    # Other thread work (DSPy's own to_thread calls) runs at once, before any generation ends.
    assert await asyncio.to_thread(lambda: "ran") == "ran"
    assert not any(task.done() for task in tasks)
    await asyncio.gather(*tasks)


@pytest.mark.embedded
def test_a_prompt_longer_than_the_context_is_a_context_window_error():
    from dspy.utils.exceptions import ContextWindowExceededError

    lm = dspy.LM(EMBEDDED_MODEL, engine=LlamaCppEngine(n_ctx=128), cache=False)
    with pytest.raises(ContextWindowExceededError):
        lm("word " * 400)


@pytest.mark.e2e  # a child Python loads the model and exits
@pytest.mark.embedded
def test_the_model_is_freed_at_exit_while_llama_cpp_is_still_whole():
    # Left to the interpreter's teardown, Llama.__del__ ran after llama_cpp's globals were gone and
    # printed "TypeError: 'NoneType' object is not callable" at the end of every `make test`.
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import atexit\n"
        "state = {}\n"
        # registered first (before the engine's module registers its hook on import), so it runs last
        "atexit.register(lambda: print('freed' if state['runtime'].model.model is None else 'still loaded'))\n"
        "from mlflow_dspy.lm_engine.llama_engine import embedded_runtime\n"
        "state['runtime'] = embedded_runtime(512)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "freed"
    assert "Exception ignored" not in proc.stderr
