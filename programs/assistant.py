"""`assistant`: a multi-turn chat program; earlier turns reach it as a `dspy.History`."""

import dspy

from programs.metrics import contains_answer

DESCRIPTION = "A multi-turn assistant: the conversation so far is part of every answer."
EXAMPLE_QUESTION = "What can you help me with?"
INPUTS = ("history", "question")
metric = contains_answer


class Converse(dspy.Signature):
    """Answer the user's latest message briefly, using what the conversation so far says about them."""

    history: dspy.History = dspy.InputField(desc="the conversation so far")
    question: str = dspy.InputField(desc="the user's latest message")
    answer: str = dspy.OutputField(desc="a short reply")


def build() -> dspy.Module:
    return dspy.Predict(Converse)
