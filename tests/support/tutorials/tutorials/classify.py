"""ChainOfThought with a `Literal` label."""

from typing import Literal

import dspy


class Sentiment(dspy.Signature):
    """Classify the sentiment of the review."""

    review: str = dspy.InputField()
    label: Literal["positive", "negative", "neutral"] = dspy.OutputField()


def build():
    return dspy.ChainOfThought(Sentiment)
