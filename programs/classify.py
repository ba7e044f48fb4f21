"""`classify`: sentiment with typed outputs, a `Literal` label and a float confidence.

With two outputs and no answer field named, a chat answer is both, as one JSON
object: `{"label": "positive", "confidence": 0.9}`. In a chat, the text is the
last user message and the turns before it are the history (what "it" refers to).
"""

from typing import Literal

import dspy

Label = Literal["positive", "negative", "neutral"]


class Sentiment(dspy.Signature):
    """Classify the sentiment of the text."""

    text: str = dspy.InputField()
    history: dspy.History = dspy.InputField(desc="the conversation so far, for context")
    label: Label = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="between 0 and 1")


def label_matches(example, prediction, trace=None) -> bool:
    return getattr(prediction, "label", None) == example.label


def build() -> dspy.Module:
    return dspy.Predict(Sentiment)
