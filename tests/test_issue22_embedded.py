"""Issue 22: the embedded engine answers every output type DSPy asks for, and bounds degenerate generation.

The programs of DSPy's tutorials (tests/support/tutorials) answer on the real embedded model and their answers
parse: ReAct with two tools (DSPy asks for "any JSON object" there; the engine reads the fields and the tools
from DSPy's prompt), a `list[str]` extractor, a Pydantic output, a `Literal` label, BestOfN with a float.
A loop is stopped (free text) or closed (JSON) and finishes "length" with its real usage; an answer near its
budget is closed so that it parses; a long answer that does not repeat itself is never cut; the thread count
is a setting that reaches the llama context. The schema and guard logic is also pinned without the model.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from pathlib import Path
from typing import Any, Literal

import dspy
import pydantic
import pytest
from dspy.lm15 import Config, Message, Request, StreamDeltaEvent, StreamEndEvent

from mlflow_dspy import cli
from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.lm_engine import llama_engine
from mlflow_dspy.lm_engine.answer_bounds import ClosingPlan, JsonLevel, Repetition, RepetitionLimit
from mlflow_dspy.lm_engine.embedded_settings import THREADS_ENV, EmbeddedSettings
from mlflow_dspy.lm_engine.llama_native import grammar_for_schema
from mlflow_dspy.lm_engine.output_schema import (
    LIST_ITEMS,
    OPEN_MEMBERS,
    SCALAR,
    STRUCTURE_MARK,
    bounded,
    closing_answer,
    prompt_schema,
)

TUTORIALS = Path(__file__).parent / "support" / "tutorials"

LIST_OF_WORDS = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"}}},
                 "required": ["words"], "additionalProperties": False}
REASONED = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}},
            "required": ["reasoning", "answer"], "additionalProperties": False}


# -- without the model: the schema DSPy's prompt describes, and its bounds ------------------------------------
def _react_system() -> str:
    import sys

    sys.path.insert(0, str(TUTORIALS))
    try:
        from tutorials.agent import build
    finally:
        sys.path.remove(str(TUTORIALS))
    react = build()
    return dspy.JSONAdapter().format(react.react.signature, [], {"question": "q", "trajectory": ""})[0]["content"]


@pytest.mark.unit
def test_react_steps_are_decoded_as_one_choice_per_tool_with_that_tools_own_arguments():
    schema = prompt_schema(_react_system())
    assert schema is not None
    choices = {choice["properties"]["next_tool_name"]["const"]: choice for choice in schema["anyOf"]}
    assert list(choices) == ["calculator", "lookup", "finish"]
    arguments = {name: choice["properties"]["next_tool_args"] for name, choice in choices.items()}
    assert arguments["calculator"]["properties"] == {"expression": {"type": "string"}}
    assert arguments["calculator"]["required"] == ["expression"]
    assert arguments["lookup"]["required"] == ["country"]
    assert arguments["finish"] == {"type": "object", "properties": {}, "additionalProperties": False, "required": []}
    for choice in choices.values():
        assert list(choice["properties"]) == ["next_thought", "next_tool_name", "next_tool_args"]
        assert choice["required"] == list(choice["properties"]) and choice["additionalProperties"] is False


class Order(pydantic.BaseModel):
    item: str
    quantity: int


class EveryType(dspy.Signature):
    """Fill every field."""

    question: str = dspy.InputField()
    text: str = dspy.OutputField()
    label: Literal["a; b", "c"] = dspy.OutputField()
    count: int = dspy.OutputField()
    share: float = dspy.OutputField()
    sure: bool = dspy.OutputField()
    names: list[str] = dspy.OutputField()
    order: Order = dspy.OutputField()
    orders: list[Order] = dspy.OutputField()
    extra: dict[str, Any] = dspy.OutputField()


@pytest.mark.unit
def test_the_fields_dspys_prompt_describes_are_read_back_as_a_schema_of_their_types():
    adapter = dspy.JSONAdapter()
    system = adapter.format(EveryType, [], {"question": "q"})[0]["content"]
    assert STRUCTURE_MARK in system  # DSPy still describes its output fields this way (else: read nothing)
    schema = prompt_schema(system)
    assert schema is not None
    properties = schema["properties"]
    assert list(properties) == list(EveryType.output_fields) == schema["required"]
    assert properties["text"] == {"type": "string"}
    assert properties["label"] == {"enum": ["a; b", "c"]}  # the annotation keeps a value holding "; " whole
    assert (properties["count"], properties["share"], properties["sure"]) == (
        {"type": "integer"}, {"type": "number"}, {"type": "boolean"})
    assert properties["names"] == {"type": "array", "items": {"type": "string"}}
    assert properties["order"]["required"] == ["item", "quantity"]
    assert properties["order"]["properties"]["quantity"]["type"] == "integer"
    assert properties["orders"]["items"] == {"$ref": "#/$defs/Order"}  # its definitions moved to the root
    assert schema["$defs"]["Order"]["required"] == ["item", "quantity"]
    assert properties["extra"]["type"] == "object"
    # An answer of that schema parses under DSPy's own adapter.
    answer = {"text": "t", "label": "a; b", "count": 2, "share": 0.5, "sure": True, "names": ["x"],
              "order": {"item": "tea", "quantity": 1}, "orders": [], "extra": {"k": "v"}}
    parsed = adapter.parse(EveryType, json.dumps(answer))
    assert parsed["order"] == Order(item="tea", quantity=1) and parsed["label"] == "a; b"


@pytest.mark.unit
def test_a_system_message_that_is_not_dspys_gives_no_schema():
    assert prompt_schema("You are a helpful assistant.") is None
    assert prompt_schema(STRUCTURE_MARK + '{"a": "not a placeholder"}') is None


@pytest.mark.unit
def test_open_objects_and_lists_are_bounded_and_declared_objects_hold_their_properties_only():
    schema = bounded({"type": "object", "properties": {
        "args": {"type": "object", "additionalProperties": True},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "few": {"type": "array", "items": {}, "maxItems": 3},
        "empty": {"type": "object", "properties": {}, "additionalProperties": False},
        "anything": {"title": "Anything"},
    }, "required": ["args"]})
    properties = schema["properties"]
    assert properties["args"] == {"type": "object", "additionalProperties": SCALAR, "maxProperties": OPEN_MEMBERS}
    assert properties["counts"]["additionalProperties"] == {"type": "integer"}
    assert properties["tags"]["maxItems"] == LIST_ITEMS and properties["few"] == {
        "type": "array", "items": SCALAR, "maxItems": 3}
    assert properties["empty"] == {"type": "object", "properties": {}, "additionalProperties": False}
    assert properties["anything"] == SCALAR
    assert schema["additionalProperties"] is False
    grammar = grammar_for_schema(schema)
    assert f"{{0,{OPEN_MEMBERS - 1}}}" in grammar  # at most OPEN_MEMBERS members
    assert grammar_for_schema({}) == grammar_for_schema(None)  # any JSON object: bounded too


@pytest.mark.unit
def test_closing_an_answer_may_have_to_write_each_required_field_and_the_longest_choice():
    schema = bounded(prompt_schema(_react_system()))
    assert closing_answer(schema) == {"next_thought": "", "next_tool_name": "calculator",
                                      "next_tool_args": {"expression": ""}}
    plan = ClosingPlan((("reasoning", 4, 2), ("answer", 4, 2)), margin=4)
    assert plan.reserve == 4 + 1 + 12
    assert plan.room('{"reasoning": "a long thought') == 4 + 2 + 6
    assert plan.room('{"reasoning": "done", "answer": "the ans') == 4 + 2


@pytest.mark.unit
def test_the_repetition_guard_finds_a_span_written_again_and_again_or_a_count_and_nothing_in_plain_text():
    limit = RepetitionLimit()
    words = Path(__file__).resolve().parents[1].joinpath("README.md").read_text().split()[:3000]
    vocabulary: dict[str, int] = {}
    guard = Repetition(limit)
    assert not any(guard.add(vocabulary.setdefault(word, len(vocabulary))) for word in words)

    span = [7, 8, 9, 10, 11, 12]  # six tokens: a loop once the run reaches `min_tokens`
    guard = Repetition(limit)
    found = [guard.add(token) for token in [1, 2, 3] + span * 10]
    first = next(i for i, period in enumerate(found) if period)
    assert found[first] == len(span)
    assert first + 1 == 3 + max(limit.min_tokens, limit.repeats * len(span))

    guard = Repetition(limit)  # one token again and again: only once `min_tokens` long
    assert [bool(guard.add(5)) for _ in range(limit.min_tokens)] == [False] * (limit.min_tokens - 1) + [True]

    # A count ("1, 2, 3, ..."): no span repeats token for token, but its shape does (digits as one mark),
    # and counts as a loop once that runs `min_tokens_counting` tokens.
    comma, space, digit = (1, 1), (2, 2), 0
    count = [token for n in range(1, 200) for token in [*((100 + int(d), digit) for d in str(n)), comma, space]]
    guard = Repetition(limit)
    found = [guard.add(token, shape) for token, shape in count]
    first = next(i for i, period in enumerate(found) if period)
    assert found[first] == 4 and first + 1 >= limit.min_tokens_counting  # "10, " to "99, ": four tokens each


@pytest.mark.unit
def test_the_json_level_follows_strings_escapes_and_brackets():
    level = JsonLevel()
    assert level.feed(b'{"a": ["x\\"]') == 0 and level.level == 3  # in the string still: the quote is escaped
    assert level.feed(b'", "y"') == 2 and level.level == 2
    assert level.overruns(b"]", 1) is False and level.overruns(b"], ", 1) is True  # a list closed, then more
    assert level.feed("\"é\u201c\"]}".encode()) == 0 and level.level == 0


@pytest.mark.unit
def test_the_thread_count_is_a_gateway_setting_that_the_embedded_model_reads(monkeypatch):
    args = cli.build_parser().parse_args(["gateway", "--program", "qa", "--embedded-threads", "3"])
    config = GatewayConfig.resolve(vars(args), {})
    assert config.embedded_threads == 3  # neither the suite's 1 nor this machine's 2
    for name, text in config.environment().items():
        monkeypatch.setenv(name, text)
    assert EmbeddedSettings.from_env().threads == 3
    monkeypatch.delenv(THREADS_ENV)
    assert EmbeddedSettings.from_env().threads >= 1
    assert GatewayConfig().embedded_threads is None


# -- on the real model: the tutorial programs -----------------------------------------------------------------
@pytest.fixture
def responses(monkeypatch) -> list[Any]:
    """Every Response the embedded engine gives in the test."""
    seen: list[Any] = []
    original = llama_engine._response

    def recorded(items):
        response = original(items)
        seen.append(response)
        return response

    monkeypatch.setattr(llama_engine, "_response", recorded)
    return seen


def tutorial(name: str, monkeypatch):
    from mlflow_dspy.runtime.host import ProgramHost

    monkeypatch.delenv("DSPY_LM", raising=False)
    monkeypatch.chdir(TUTORIALS)
    monkeypatch.syspath_prepend(str(TUTORIALS))
    host = ProgramHost.from_program(name)
    assert isinstance(host.lm.engine, llama_engine.LlamaCppEngine)
    return host


@pytest.mark.parametrize("question", ["What is 7 * 6?", "What is the capital of Peru?"])
@pytest.mark.slow
@pytest.mark.embedded
def test_react_with_two_tools_answers_and_its_trajectory_calls_them_with_their_own_arguments(question, monkeypatch):
    host = tutorial("agent", monkeypatch)
    prediction = asyncio.run(host.answer([{"role": "user", "content": question}]))
    assert isinstance(prediction.answer, str) and prediction.answer
    trajectory = prediction.trajectory
    called = [trajectory[key] for key in trajectory if key.startswith("tool_name_")]
    assert called and set(called) <= {"calculator", "lookup", "finish"}
    parameters = {"calculator": {"expression"}, "lookup": {"country"}, "finish": set()}
    for step, name in enumerate(called):
        assert set(trajectory[f"tool_args_{step}"]) == parameters[name]
    assert any(name != "finish" for name in called), "no tool was called"


@pytest.mark.slow
@pytest.mark.embedded
def test_the_list_extractor_answers_a_list_of_strings_even_when_the_model_loops(monkeypatch, responses):
    host = tutorial("entities", monkeypatch)
    for sentence in ["Eve visited Rome.", "Carol met Dan in Tokyo."]:
        prediction = asyncio.run(host.predict({"sentences": [sentence]}))
        assert isinstance(prediction.entities, list) and prediction.entities
        assert all(isinstance(entity, str) for entity in prediction.entities)
    # "Eve visited Rome." makes the model list the sentence again and again: the loop is closed, far
    # from the 512-token budget.
    looped = [r for r in responses if r.provider_data and r.provider_data["loops_stopped"]]
    assert looped and all(r.finish_reason == "length" and r.usage.output_tokens < 128 for r in looped)
    # The input example `log` runs ("Hello.", a string where a list is expected) makes it count "1, 2, 3, ..."
    # in its reasoning: stopped as a loop too, and the answer parses.
    responses.clear()
    prediction = asyncio.run(host.answer(host.example))
    assert isinstance(prediction.entities, list)
    assert [r.finish_reason for r in responses] == ["length"]
    assert responses[0].usage.output_tokens < llama_engine.DEFAULT_MAX_TOKENS // 2


@pytest.mark.slow
@pytest.mark.embedded
def test_the_pydantic_order_parses_into_its_model(monkeypatch):
    host = tutorial("orders", monkeypatch)
    prediction = asyncio.run(host.predict({"customer": "Ada", "message": "Two coffees please"}))
    assert type(prediction.order).__name__ == "Order"
    assert isinstance(prediction.order.item, str) and isinstance(prediction.order.quantity, int)


@pytest.mark.slow
@pytest.mark.embedded
def test_the_literal_classifier_answers_one_of_its_labels(monkeypatch):
    host = tutorial("sentiment", monkeypatch)
    for review in ["I loved it, works perfectly.", "Broke after a day. Terrible."]:
        prediction = asyncio.run(host.predict({"review": review}))
        assert prediction.label in ("positive", "negative", "neutral")


@pytest.mark.slow
@pytest.mark.embedded
def test_best_of_n_answers_a_float(monkeypatch):
    host = tutorial("best-of", monkeypatch)
    prediction = asyncio.run(host.answer([{"role": "user", "content": "What is half of 9?"}]))
    assert isinstance(prediction.answer, float)


# -- on the real model: loops, the budget, long answers, threads ----------------------------------------------
def _request(text: str, schema: dict[str, Any] | None = None, max_tokens: int | None = None) -> Request:
    fmt = {"type": "json_schema", "schema": schema} if schema else None
    return Request(model=llama_engine.EMBEDDED_MODEL, messages=(Message.user(text),),
                   config=Config(response_format=fmt, max_tokens=max_tokens, temperature=0.0))


@pytest.mark.slow
@pytest.mark.embedded
def test_a_looping_json_answer_is_closed_parses_and_finishes_length_with_its_real_usage():
    engine = llama_engine.LlamaCppEngine()
    request = _request("Write the word hello fifty times.", LIST_OF_WORDS)
    response = engine.complete(request)
    text = response.message.parts[0].text
    words = json.loads(text)["words"]
    assert len(words) > 3 and set(words) == {"hello"}  # what was written before the loop was closed
    assert response.finish_reason == "length" and response.provider_data["loops_stopped"] == 1
    assert 0 < response.usage.output_tokens < llama_engine.DEFAULT_MAX_TOKENS
    # Streamed: the same answer, the same end, and one text piece per token sampled.
    events = list(engine.stream(request))
    deltas = [e.delta.text for e in events if isinstance(e, StreamDeltaEvent)]
    end = events[-1]
    assert isinstance(end, StreamEndEvent) and "".join(deltas) == text
    assert (end.finish_reason, end.usage.output_tokens, end.provider_data) == (
        "length", len(deltas), response.provider_data)


@pytest.mark.slow
@pytest.mark.embedded
def test_looping_free_text_stops_and_finishes_length_with_its_real_usage():
    response = llama_engine.LlamaCppEngine().complete(_request("Repeat the word hello ten times."))
    assert response.finish_reason == "length" and response.provider_data["loops_stopped"] == 1
    assert 0 < response.usage.output_tokens < 64
    assert response.message.parts[0].text.lower().count("hello") > 3


@pytest.mark.slow
@pytest.mark.embedded
def test_a_json_answer_that_reaches_its_max_tokens_is_closed_within_them_and_parses():
    response = llama_engine.LlamaCppEngine().complete(_request("Count from 1 to 100, then say done.", REASONED, 80))
    answer = json.loads(response.message.parts[0].text)
    assert set(answer) == {"reasoning", "answer"} and answer["reasoning"].startswith("1, 2, 3")
    assert response.finish_reason == "length" and response.provider_data == {
        "loops_stopped": 0, "closed_at_budget": True}
    assert response.usage.output_tokens <= 80


def _generate(scheduler, request: Request) -> tuple[str, Any]:
    from mlflow_dspy.lm_engine.llama_scheduler import Outcome

    items: queue.SimpleQueue = queue.SimpleQueue()
    scheduler.submit(llama_engine.scheduler_job(scheduler.model, request, llama_engine.DEFAULT_MAX_TOKENS,
                                                items.put, threading.Event()))
    text = ""
    while not isinstance(item := items.get(timeout=600), Outcome):
        if isinstance(item, BaseException):
            raise item
        text += item
    return text, item


@pytest.mark.slow
@pytest.mark.embedded
def test_long_answers_that_do_not_repeat_themselves_are_not_cut_by_the_guard():
    from mlflow_dspy.lm_engine.llama_native import ContextShape
    from mlflow_dspy.lm_engine.llama_scheduler import Scheduler

    shape = ContextShape(sequences=2, tokens_per_sequence=2048, threads=EmbeddedSettings.from_env().threads)
    guarded = Scheduler(llama_engine.embedded_model(), shape, 0, 4)
    unguarded = Scheduler(llama_engine.embedded_model(), shape, 0, 4,
                          RepetitionLimit(repeats=10**6, min_tokens=10**6))
    try:
        for request, finish in [(_request("Count from 1 to 60."), "stop"),  # 121 tokens, ends by itself
                                (_request("Write a long story about a dragon.", max_tokens=300), "length")]:
            text, outcome = _generate(guarded, request)
            assert (text, outcome.finish_reason) == (_generate(unguarded, request)[0], finish)
            assert outcome.loops_stopped == 0 and outcome.completion_tokens > 2 * RepetitionLimit().min_tokens
    finally:
        guarded.close()
        unguarded.close()


@pytest.mark.slow
@pytest.mark.embedded
def test_the_thread_count_setting_reaches_the_llama_context(monkeypatch):
    from llama_cpp import llama_cpp as native

    monkeypatch.setenv(THREADS_ENV, "3")  # neither the suite's 1 nor this machine's 2
    monkeypatch.setenv("MLFLOW_DSPY_EMBEDDED_PARALLEL", "1")
    runtime = llama_engine._Runtime(256, EmbeddedSettings.from_env())
    try:
        assert runtime.scheduler.context.shape.threads == 3
        assert native.llama_n_threads(runtime.scheduler.context.ctx) == 3
    finally:
        runtime.scheduler.close()
