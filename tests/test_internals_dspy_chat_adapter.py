"""The gateway's ServingChatAdapter writes exactly the prompts DSPy's ChatAdapter writes."""

import contextlib
import pickle

import dspy
import pytest
from dspy.utils import DummyLM

from mlflow_dspy.internals.dspy_chat_adapter import ServingChatAdapter, serving_adapter
from tests.support.examples import EXAMPLE_NAMES, example_chat

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3? I love this phone."},
]


def prompts(adapter, program_name: str) -> list:
    lm = DummyLM({"3 + 3": {"reasoning": "r", "answer": "6", "label": "positive", "confidence": "0.9"}})
    program = example_chat(program_name)
    with dspy.context(lm=lm, adapter=adapter), contextlib.suppress(Exception):  # only the prompts matter
        program(messages=CONVERSATION)
    return [entry["messages"] for entry in lm.history]


@pytest.mark.parametrize("program_name", EXAMPLE_NAMES)
def test_prompts_are_identical_to_dspys_chat_adapter(program_name):
    ours = prompts(ServingChatAdapter(), program_name)
    assert ours and ours == prompts(dspy.ChatAdapter(), program_name)


def test_the_system_message_is_computed_once_per_signature():
    adapter = ServingChatAdapter()
    signature = dspy.Signature("question -> answer")
    first = adapter.format_system_message(signature)
    assert adapter.format_system_message(signature) is first
    assert adapter.format_system_message(signature.with_instructions("Other.")) != first


def test_only_the_default_adapter_is_replaced_and_the_cache_is_not_pickled():
    assert isinstance(serving_adapter(None), ServingChatAdapter)
    chosen = dspy.JSONAdapter()
    assert serving_adapter(chosen) is chosen
    adapter = ServingChatAdapter()
    adapter.format_system_message(dspy.Signature("question -> answer"))
    restored = pickle.loads(pickle.dumps(adapter))
    assert len(restored._system_messages) == 0


def test_plain_text_inputs_are_formatted_without_building_a_pydantic_type_adapter(monkeypatch):
    import dspy.adapters.utils as dspy_utils

    built = []
    real = dspy_utils.TypeAdapter
    monkeypatch.setattr(dspy_utils, "TypeAdapter", lambda *a, **k: built.append(a) or real(*a, **k))
    signature = dspy.Signature("context, question -> answer")
    inputs = {"context": "Paris is in France.", "question": "Where is Paris?"}
    ours = ServingChatAdapter().format_user_message_content(signature, inputs, main_request=True)
    assert built == []
    assert ours == dspy.ChatAdapter().format_user_message_content(signature, inputs, main_request=True)
    assert built, "DSPy's own path builds one per field: the check above is not vacuous"


def test_a_signature_with_a_history_is_split_from_it_once_not_per_call(monkeypatch):
    """DSPy builds the signature without its history field (a new class) on every call; ours once."""
    calls = []
    real = dspy.Signature.delete.__func__
    monkeypatch.setattr(dspy.Signature, "delete", classmethod(lambda cls, name: calls.append(name) or real(cls, name)))
    signature = dspy.Signature("question, history: dspy.History -> answer")
    history = dspy.History(messages=[{"question": "Who am I?", "answer": "Ada"}])
    ours, dspys = ServingChatAdapter(), dspy.ChatAdapter()
    for _ in range(3):
        assert ours.format(signature, [], {"question": "And you?", "history": history}) == \
            dspys.format(signature, [], {"question": "And you?", "history": history})
    assert calls.count("history") == 3 + 1  # DSPy's three calls, and ours once
