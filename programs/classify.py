"""`classify`: sentiment with typed outputs, a `Literal` label and a float confidence.

With two outputs and no answer field named, a chat answer is both, as one JSON
object: `{"label": "positive", "confidence": 0.9}`.
"""

from typing import Literal

import dspy

Label = Literal["positive", "negative", "neutral"]


class Sentiment(dspy.Signature):
    """Classify the sentiment of the text."""

    text: str = dspy.InputField()
    label: Label = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="between 0 and 1")


def label_matches(example, prediction, trace=None) -> bool:
    return getattr(prediction, "label", None) == example.label


def build() -> dspy.Module:
    return dspy.Predict(Sentiment)
