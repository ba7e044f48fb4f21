"""ChatMapping.of: which input each part of a chat fills, and which outputs answer, read from the program."""

from __future__ import annotations

import json
from typing import Literal

import cloudpickle
import dspy
import pytest

from mlflow_dspy.program.chat import ChatInputError, ChatProgram
from mlflow_dspy.program.mapping import ChatMapping, MappingProblem


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Blob:
    """A type no JSON value can be read as."""


class Converse(dspy.Signature):
    """Answer using the conversation so far."""

    history: dspy.History = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Sentiment(dspy.Signature):
    """Classify the sentiment."""

    text: str = dspy.InputField()
    label: Literal["positive", "negative"] = dspy.OutputField()
    stars: int = dspy.OutputField()


class Triage(dspy.Module):
    """Two steps: the first predictor's `summary` is consumed by the second."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("ticket -> summary")
        self.route = dspy.Predict("summary, priority: int -> category, queue")

    def forward(self, ticket: str, priority: int = 1) -> dspy.Prediction:
        summary = self.summarize(ticket=ticket).summary
        return self.route(summary=summary, priority=priority)


class NeedsBlob(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str, blob: Blob) -> dspy.Prediction:
        return self.answer(question=question)


class MayTakeBlob(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question, count: int -> answer")

    def forward(self, question: str, count: int, blob: Blob | None = None) -> dspy.Prediction:
        return self.answer(question=question, count=count)


def names(fields) -> list[str]:
    return [f.name for f in fields]


# -- one input, one output ---------------------------------------------------------

def test_one_input_is_the_question_and_one_output_the_answer():
    mapping = ChatMapping.of(dspy.Predict("question -> answer"))
    assert mapping.question_field == "question" and mapping.json_fields == ()
    assert mapping.answer_fields == ("answer",)
    assert mapping.history_field is None and mapping.context_field is None


def test_one_input_of_any_name_is_filled_by_the_last_user_message():
    program = ChatProgram(dspy.Predict("query -> reply"))
    _, kwargs = program.prepare([{"role": "user", "content": "second"}])
    assert kwargs == {"query": "second"}
    _, kwargs = program.prepare([{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                                 {"role": "user", "content": "second"}])
    assert kwargs["query"].endswith("The question now:\nsecond")  # earlier turns folded in


def test_chain_of_thought_reasoning_is_never_an_answer_field():
    mapping = ChatMapping.of(dspy.ChainOfThought("question -> answer"))
    assert mapping.answer_fields == ("answer",)
    assert "reasoning" not in names(mapping.outputs)
    assert names(mapping.inputs) == ["question"]


def test_chain_of_thought_with_several_outputs_answers_with_all_but_reasoning():
    mapping = ChatMapping.of(dspy.ChainOfThought("question -> answer, confidence: float"))
    assert mapping.answer_fields == ("answer", "confidence")


# -- history and context -----------------------------------------------------------

def test_history_input_gets_the_earlier_turns():
    program = ChatProgram(dspy.Predict(Converse))
    assert program.mapping.history_field == "history" and program.mapping.question_field == "question"
    _, kwargs = program.prepare([
        {"role": "user", "content": "I am Ada"}, {"role": "assistant", "content": "Hello Ada"},
        {"role": "user", "content": "Who am I?"},
    ])
    assert kwargs["question"] == "Who am I?"
    assert isinstance(kwargs["history"], dspy.History)
    assert kwargs["history"].messages == [{"question": "I am Ada", "answer": "Hello Ada"}]


def test_two_history_inputs_are_refused_naming_them():
    with pytest.raises(MappingProblem, match="history inputs: h1, h2"):
        ChatMapping.of(dspy.Predict("h1: dspy.History, h2: dspy.History, question -> answer"))


@pytest.mark.parametrize("context", ["context", "system"])
def test_input_named_context_or_system_gets_the_system_messages(context):
    program = ChatProgram(dspy.Predict(f"{context}, question -> answer"))
    assert program.mapping.context_field == context and program.mapping.question_field == "question"
    _, kwargs = program.prepare([{"role": "system", "content": "Be brief."}, *user("Why?")])
    assert kwargs == {context: "Be brief.", "question": "Why?"}


def test_context_field_option_names_the_input_system_messages_fill():
    program = dspy.Predict("policy, ticket -> category")
    assert ChatMapping.of(program).json_fields == ("policy", "ticket")  # without the option: two free inputs
    chat = ChatProgram(program, ChatMapping.of(program, context_field="policy"))
    assert chat.mapping.question_field == "ticket" and chat.mapping.json_fields == ()
    _, kwargs = chat.prepare([{"role": "system", "content": "Refunds go to billing."}, *user("Refund me")])
    assert kwargs == {"policy": "Refunds go to billing.", "ticket": "Refund me"}


def test_system_messages_without_a_context_input_extend_a_copy_of_the_instructions():
    base = dspy.Predict("question -> answer")
    program, kwargs = ChatProgram(base).prepare([{"role": "system", "content": "Answer in French."}, *user("Hi")])
    assert kwargs == {"question": "Hi"}
    assert program is not base and "Answer in French." in program.signature.instructions
    assert "Answer in French." not in base.signature.instructions


def test_a_program_whose_only_inputs_are_context_has_nothing_for_the_user_message():
    with pytest.raises(MappingProblem, match="no input a user's message can fill"):
        ChatMapping.of(dspy.Predict("context -> answer"))


# -- several inputs: the user message is a JSON object --------------------------------

SEVERAL = "ticket: str, priority: int -> category"


def test_several_inputs_are_filled_from_a_json_user_message():
    mapping = ChatMapping.of(dspy.Predict(SEVERAL))
    assert mapping.question_field is None and mapping.json_fields == ("ticket", "priority")


def test_json_user_message_is_typed_by_the_program_fields():
    _, kwargs = ChatProgram(dspy.Predict(SEVERAL)).prepare(user('{"ticket": "Refund me", "priority": 2}'))
    assert kwargs == {"ticket": "Refund me", "priority": 2}
    assert type(kwargs["priority"]) is int


def test_json_user_message_with_a_wrong_type_names_the_field():
    with pytest.raises(ChatInputError, match="'priority'"):
        ChatProgram(dspy.Predict(SEVERAL)).prepare(user('{"ticket": "Refund me", "priority": "high"}'))


def test_json_user_message_missing_a_field_names_it():
    with pytest.raises(ChatInputError, match="the input field 'ticket' is missing"):
        ChatProgram(dspy.Predict(SEVERAL)).prepare(user('{"priority": 2}'))


def test_json_user_message_with_an_unknown_field_names_it():
    with pytest.raises(ChatInputError, match="'colour' is not an input"):
        ChatProgram(dspy.Predict(SEVERAL)).prepare(user('{"ticket": "x", "priority": 2, "colour": "red"}'))


@pytest.mark.parametrize("text", ["Refund me please", '["ticket", "priority"]', '"just a string"'])
def test_user_message_that_is_not_a_json_object_names_the_expected_fields(text):
    with pytest.raises(ChatInputError, match=r"JSON object .*\(ticket, priority\)"):
        ChatProgram(dspy.Predict(SEVERAL)).prepare(user(text))


# -- outputs -----------------------------------------------------------------------

def test_several_outputs_all_answer_unless_one_is_named():
    program = dspy.Predict("question -> answer, confidence: float")
    assert ChatMapping.of(program).answer_fields == ("answer", "confidence")
    assert ChatMapping.of(program, answer_field="confidence").answer_fields == ("confidence",)


def test_typed_outputs_keep_their_literal_and_int_types():
    mapping = ChatMapping.of(dspy.Predict(Sentiment))
    types = {f.name: f.annotation for f in mapping.outputs}
    assert types == {"label": Literal["positive", "negative"], "stars": int}
    assert mapping.answer_fields == ("label", "stars")
    assert mapping.describe()["outputs"] == {"label": {"type": "Literal['positive', 'negative']"},
                                             "stars": {"type": "int"}}


def test_only_a_single_text_answer_streams():
    assert ChatProgram(dspy.Predict("question -> answer")).streams_answer
    sentiment = dspy.Predict(Sentiment)
    assert not ChatProgram(sentiment).streams_answer  # two answer fields: one JSON object
    assert not ChatProgram(sentiment, ChatMapping.of(sentiment, answer_field="label")).streams_answer


# -- a custom module ---------------------------------------------------------------

def test_custom_module_inputs_come_from_forward_with_defaults_optional():
    mapping = ChatMapping.of(Triage())
    assert [(f.name, f.annotation, f.required) for f in mapping.inputs] == [
        ("ticket", str, True), ("priority", int, False)]
    assert mapping.json_fields == ("ticket", "priority")


def test_custom_module_outputs_are_those_no_other_predictor_consumes():
    mapping = ChatMapping.of(Triage())
    assert names(mapping.outputs) == ["category", "queue"]  # `summary` feeds the second predictor
    assert mapping.answer_fields == ("category", "queue")


def test_custom_module_optional_input_may_be_left_out_of_the_json_message():
    _, kwargs = ChatProgram(Triage()).prepare(user('{"ticket": "Refund me"}'))
    assert kwargs == {"ticket": "Refund me"}  # forward's default applies


def test_custom_module_question_field_is_allowed_when_the_rest_is_optional():
    program = Triage()
    mapping = ChatMapping.of(program, question_field="ticket", answer_field="category")
    assert mapping.question_field == "ticket" and mapping.answer_fields == ("category",)
    _, kwargs = ChatProgram(program, mapping).prepare(user("Refund me"))
    assert kwargs == {"ticket": "Refund me"}


def test_question_field_is_refused_when_other_inputs_are_required():
    with pytest.raises(MappingProblem, match="also requires priority"):
        ChatMapping.of(dspy.Predict(SEVERAL), question_field="ticket")


def test_custom_module_runs_through_chat_with_dummy_lm():
    lm = dspy.utils.DummyLM({
        "Refund me": {"summary": "wants a refund"},
        "wants a refund": {"category": "billing", "queue": "finance"},
    })
    with dspy.context(lm=lm):
        prediction = ChatProgram(Triage())(user('{"ticket": "Refund me", "priority": 3}'))
    assert (prediction.category, prediction.queue) == ("billing", "finance")


# -- what cannot be mapped -----------------------------------------------------------

def test_required_input_of_a_type_json_cannot_fill_is_named():
    with pytest.raises(MappingProblem, match="required inputs blob: their types cannot be read from JSON"):
        ChatMapping.of(NeedsBlob())


def test_optional_input_of_a_type_json_cannot_fill_does_not_stop_a_json_message():
    program = ChatProgram(MayTakeBlob())
    _, kwargs = program.prepare(user('{"question": "How many?", "count": 2}'))
    assert kwargs == {"question": "How many?", "count": 2}
    with pytest.raises(ChatInputError, match="'blob'"):
        program.prepare(user('{"question": "How many?", "count": 2, "blob": {}}'))


@pytest.mark.parametrize("option", ["question_field", "context_field"])
def test_unknown_input_name_is_refused_naming_it_and_the_inputs(option):
    with pytest.raises(MappingProblem, match=r"'query' is not an input of the program; its inputs: question"):
        ChatMapping.of(dspy.Predict("question -> answer"), **{option: "query"})


def test_unknown_answer_field_is_refused_naming_it_and_the_outputs():
    program = dspy.ChainOfThought("question -> answer, confidence: float")
    with pytest.raises(MappingProblem, match=r"'reasoning' is not an output of the program; its outputs: "
                                             r"answer, confidence"):
        ChatMapping.of(program, answer_field="reasoning")


# -- pickled with the program --------------------------------------------------------

def test_mapping_pickles_without_its_json_model_and_rebuilds_it():
    program = dspy.Predict(SEVERAL)
    mapping = ChatMapping.of(program)
    assert mapping.json_model is not None  # built and cached before pickling
    restored = cloudpickle.loads(cloudpickle.dumps(mapping))
    assert "json_model" not in restored.__dict__
    assert restored == mapping
    _, kwargs = ChatProgram(program, restored).prepare(user(json.dumps({"ticket": "x", "priority": 4})))
    assert kwargs == {"ticket": "x", "priority": 4}
    with pytest.raises(ChatInputError, match="'priority'"):
        ChatProgram(program, restored).prepare(user('{"ticket": "x", "priority": "high"}'))


def test_chat_program_pickles_with_its_mapping():
    restored = cloudpickle.loads(cloudpickle.dumps(ChatProgram(Triage())))
    assert restored.mapping.json_fields == ("ticket", "priority")
    assert restored.prepare(user('{"ticket": "x"}'))[1] == {"ticket": "x"}
