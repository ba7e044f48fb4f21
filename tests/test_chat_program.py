"""The chat wrapper: which turn is answered, what becomes history and
instructions, and what is refused (DummyLM in dict mode: deterministic)."""

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.program.chat import ChatInputError, ChatProgram, parse_conversation
from tests.support.examples import example_chat


@pytest.fixture
def dummy():
    answers = {  # DummyLM answers the first key its prompt contains: the last turn comes first (turns are folded)
        "last question": {"reasoning": "r2", "answer": "answer to the last"},
        "first question": {"reasoning": "r1", "answer": "answer to the first"},
    }
    lm = DummyLM(answers)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        yield lm


def last_prompt(lm) -> list[dict]:
    return lm.history[-1]["messages"]


def test_a_program_without_history_gets_earlier_turns_folded_into_its_question(dummy):
    program = ChatProgram(dspy.ChainOfThought("question -> answer"))
    result = program(
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "answer to the first"},
            {"role": "user", "content": "last question"},
        ]
    )
    assert result.answer == "answer to the last"
    prompt = last_prompt(dummy)[-1]["content"]
    assert ("Earlier in this conversation:\nuser: first question\nassistant: answer to the first\n\n"
            "The question now:\nlast question") in prompt


def test_single_turn_matches_tutorial_call(dummy):
    result = example_chat("qa")([{"role": "user", "content": "first question"}])
    assert result.toDict() == {"reasoning": "r1", "answer": "answer to the first"}


def test_system_message_becomes_instructions_for_this_call_only(dummy):
    program = example_chat("qa")
    original = program.program.predict.signature.instructions
    program(
        messages=[
            {"role": "system", "content": "Answer like a pirate."},
            {"role": "user", "content": "last question"},
        ]
    )
    system_prompt = last_prompt(dummy)[0]["content"]
    assert "Answer like a pirate." in system_prompt
    # The shared program is untouched: the next request does not inherit it.
    assert program.program.predict.signature.instructions == original
    program(messages=[{"role": "user", "content": "last question"}])
    assert "pirate" not in last_prompt(dummy)[0]["content"]


def test_system_message_fills_a_context_input_when_the_program_has_one(dummy):
    program = ChatProgram(dspy.Predict("context, question -> answer"))
    lm = DummyLM({"last question": {"answer": "ok"}})
    with dspy.context(lm=lm):
        program(
            messages=[{"role": "system", "content": "The sky is green."}, {"role": "user", "content": "last question"}]
        )
    user_prompt = lm.history[-1]["messages"][-1]["content"]
    assert "The sky is green." in user_prompt
    assert "[[ ## context ## ]]" in user_prompt


class HistoryQA(dspy.Signature):
    """Answer the question, using the conversation so far."""

    history: dspy.History = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def test_earlier_turns_become_history_for_programs_that_take_one():
    lm = DummyLM({"last question": {"answer": "ok"}})
    program = ChatProgram(dspy.Predict(HistoryQA))
    assert program.mapping.history_field == "history"
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        program(
            messages=[
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "answer to the first"},
                {"role": "user", "content": "last question"},
            ]
        )
    prompt = lm.history[-1]["messages"]
    # ChatAdapter renders history as earlier user/assistant message pairs.
    texts = [m["content"] for m in prompt]
    assert any("first question" in t for t in texts[1:-1])
    assert any("answer to the first" in t for t in texts[1:-1])
    assert "first question" not in texts[-1]


def test_history_pairs_turns_in_order():
    conversation = parse_conversation(
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"},
        ]
    )
    from mlflow_dspy.program.chat import history_entries

    assert conversation.question == "q3"
    assert history_entries(conversation.turns, "question", "answer") == [
        {"question": "q1", "answer": "a1"},
        {"question": "q2", "answer": "a2"},
    ]


def test_text_parts_are_joined():
    conversation = parse_conversation(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert conversation.question == "a\nb"


@pytest.mark.parametrize(
    ("messages", "named"),
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        (None, "must be a list"),
        (["hello"], "messages[0] must be an object"),
        ([{"role": "system", "content": "be nice"}], "no user message"),
        ([{"role": "assistant", "content": "hi"}], "no user message"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role 'wizard'"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}], "messages[1].role 'tool'"),
        ([{"content": "hi"}], "messages[0].role None"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "user", "content": None}], "messages[0].content is missing"),
        ([{"role": "user", "content": 42}], "messages[0].content must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            "messages[0].content[0] is a 'image_url' part",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}],
            "messages[1] is an assistant message after the last user message",
        ),
    ],
)
def test_bad_conversations_are_refused_with_the_problem_named(messages, named):
    with pytest.raises(ChatInputError) as excinfo:
        parse_conversation(messages)
    assert named in str(excinfo.value.message)


def test_refusal_is_a_value_error_and_a_400_for_mlflow():
    with pytest.raises(ValueError) as excinfo:
        example_chat("qa")(messages=[])
    assert excinfo.value.get_http_status_code() == 400


def test_refusal_happens_before_any_lm_call():
    lm = DummyLM({"x": {"reasoning": "r", "answer": "a"}})
    with dspy.context(lm=lm), pytest.raises(ChatInputError):
        example_chat("qa")(messages=[{"role": "wizard", "content": "x"}])
    assert lm.history == []


async def test_async_forward_answers_the_last_turn(dummy):
    result = await example_chat("qa").acall(
        messages=[{"role": "user", "content": "first question"}, {"role": "assistant", "content": "x"},
                  {"role": "user", "content": "last question"}]
    )
    assert result.answer == "answer to the last"


class ForwardOnly(dspy.Module):
    """A user's module as most are written: a `forward`, no `aforward`."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.answer(question=question)


async def test_a_module_with_only_forward_answers_through_the_async_path():
    assert not hasattr(ForwardOnly, "aforward")  # DSPy's acall alone would fail on it
    lm = DummyLM({"capital of France": {"answer": "Paris"}})
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        result = await ChatProgram(ForwardOnly()).acall(
            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert result.answer == "Paris"


class Extract(dspy.Signature):
    """List the names."""

    sentences: list[str] = dspy.InputField()
    names: list[str] = dspy.OutputField()


class Count(dspy.Signature):
    n: int = dspy.InputField()
    doubled: int = dspy.OutputField()


class MaybeQuestion(dspy.Signature):
    question: str | None = dspy.InputField()
    answer: str = dspy.OutputField()


@pytest.mark.parametrize(("message", "sentences"), [
    ("Alice flew to Paris.", ["Alice flew to Paris."]),  # the text, as the list's one item
    ('["Alice flew to Paris.", "Bob stayed."]', ["Alice flew to Paris.", "Bob stayed."]),  # JSON of the type
    ('{"sentences": ["Bob stayed."]}', ["Bob stayed."]),  # the JSON under the input's name
])
def test_a_typed_single_input_reads_the_message_as_its_type(message, sentences):
    _, kwargs = ChatProgram(dspy.Predict(Extract)).prepare([{"role": "user", "content": message}])
    assert kwargs == {"sentences": sentences}


def test_a_typed_input_the_message_cannot_fill_is_refused_naming_it_and_its_type():
    program = ChatProgram(dspy.Predict(Count))
    assert program.prepare([{"role": "user", "content": "21"}])[1] == {"n": 21}
    with pytest.raises(ChatInputError) as refused:
        program.prepare([{"role": "user", "content": "twenty-one"}])
    assert "'n', a int" in str(refused.value)


def test_earlier_turns_are_folded_only_into_an_input_that_takes_text():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(ChatInputError) as refused:
        ChatProgram(dspy.Predict(Extract)).prepare(turns)
    assert "'sentences' is a list[str]" in str(refused.value) and "dspy.History" in str(refused.value)
    _, kwargs = ChatProgram(dspy.Predict(MaybeQuestion)).prepare(turns)
    assert kwargs["question"].startswith("Earlier in this conversation:") and kwargs["question"].endswith("c")
