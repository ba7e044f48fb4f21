"""Programs the real-client tests serve from a real gateway: scripted answers (DummyLM on the predictors, so
the gateway's own LM is never called), typed as a user's program would be."""

from __future__ import annotations

from typing import Literal

import dspy
from dspy.utils.dummies import DummyLM


class Triage(dspy.Signature):
    """Route the support ticket to a team and give it a priority from 1 to 3."""

    ticket: str = dspy.InputField()
    category: Literal["billing", "technical", "other"] = dspy.OutputField()
    priority: int = dspy.OutputField()


def qa() -> dspy.Module:
    """Answers every question the same way: what a client gets back is what matters here."""
    program = dspy.ChainOfThought("question -> answer")
    program.set_lm(DummyLM({"question": {"reasoning": "It is asked by a client.", "answer": "Hello from DSPy"}}))
    return program


def triage() -> dspy.Module:
    """Two typed outputs: what structured-output clients ask for."""
    program = dspy.Predict(Triage)
    program.set_lm(DummyLM({"ticket": {"category": "billing", "priority": 2}}))
    return program
