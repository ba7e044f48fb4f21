"""`assistant`: a multi-turn chat program; earlier turns reach it as a `dspy.History`."""

import dspy


class Converse(dspy.Signature):
    """Answer the user's latest message briefly, using what the conversation so far says about them."""

    history: dspy.History = dspy.InputField(desc="the conversation so far")
    question: str = dspy.InputField(desc="the user's latest message")
    answer: str = dspy.OutputField(desc="a short reply")


def build() -> dspy.Module:
    return dspy.Predict(Converse)
