"""DSPy's callback handler choice, remembered per class: the same handler DSPy picks, asked of DSPy once,
and still relying on the two DSPy functions it was written against."""

from __future__ import annotations

import hashlib
import inspect

import dspy
import dspy.utils.callback as dspy_callback
import pytest
from dspy.utils.callback import BaseCallback
from dspy.utils.dummies import DummyLM

from mlflow_dspy.internals import SPEEDUPS_ENV, dspy_callbacks

# dspy 3.4.1's own functions, which install() wraps. If DSPy changes them, re-read them (does the handler
# still depend only on the callback's class, the instance's class and the method?), then update these.
KNOWN = {"_get_on_start_handler": "3a242ef58fa2dd24a20f011f3f884221157ac4eee93cb303946c2de3be690b62",
         "_get_on_end_handler": "c83c7778437baff7f96e14f920a07743da00bf5ba971293ad116882b7dcbf742"}


@pytest.fixture(autouse=True)
def dspys_own_after():
    yield
    dspy_callbacks.uninstall()


def test_the_dspy_functions_it_wraps_are_the_ones_it_was_written_against():
    for name, digest in KNOWN.items():
        source = inspect.getsource(dspy_callbacks.ORIGINALS[name])
        assert hashlib.sha256(source.encode()).hexdigest() == digest, (
            f"DSPy's dspy.utils.callback.{name} changed: check mlflow_dspy/internals/dspy_callbacks.py still "
            "picks what it picks, then update the digest")


def test_the_remembered_handler_is_dspys_own_choice_and_dspy_is_asked_once_per_class():
    asked = []

    def choose(callback, instance, fn):
        asked.append(type(instance))
        return dspy_callbacks.ORIGINALS["_get_on_start_handler"](callback, instance, fn)

    remembering = dspy_callbacks.remembering(choose)
    callback = BaseCallback()
    module, adapter, lm = dspy.Predict("q -> a"), dspy.ChatAdapter(), DummyLM([])
    cases = [(module, dspy.Predict.__call__), (adapter, dspy.ChatAdapter.format), (adapter, dspy.ChatAdapter.parse),
             (lm, DummyLM.__call__)]
    for instance, fn in cases * 3:
        ours = remembering(callback, instance, fn)
        assert ours == dspy_callbacks.ORIGINALS["_get_on_start_handler"](callback, instance, fn)
    assert len(asked) == 4  # once per (class, method), not once per event


def test_installed_it_serves_dspys_dispatch_and_a_traced_program_records_as_before():
    from mlflow_dspy.program.chat import ChatProgram
    from mlflow_dspy.runtime.host import ProgramHost
    from mlflow_dspy.runtime.trace_record import TraceRecord

    def spans():
        host = ProgramHost(ChatProgram(dspy.ChainOfThought("question -> answer")),
                           DummyLM({"Q?": {"reasoning": "r", "answer": "A"}}), dspy.ChatAdapter(), "h", "t")
        record = TraceRecord()
        import asyncio

        asyncio.run(host.answer([{"role": "user", "content": "Q?"}], trace=record))
        return [(span.name, span.span_type) for span in record.spans]

    before = spans()
    assert dspy_callbacks.install() is True
    assert getattr(dspy_callback._get_on_start_handler, "remembers", False)
    assert spans() == before and ("LM.__call__", "CHAT_MODEL") in before


def test_turned_off_dspys_own_functions_stay(monkeypatch):
    monkeypatch.setenv(SPEEDUPS_ENV, "0")
    assert dspy_callbacks.install() is False
    assert dspy_callback._get_on_start_handler is dspy_callbacks.ORIGINALS["_get_on_start_handler"]
