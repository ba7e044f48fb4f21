"""`classify`: sentiment with typed outputs, a `Literal` label and a float confidence.

In a chat answer both outputs appear together, as one JSON object:
`{"label": "positive", "confidence": 0.9}` (see CHAT_FIELDS).
"""

from typing import Literal

import dspy

DESCRIPTION = "Sentiment classification with a typed label (positive/negative/neutral) and a confidence."
EXAMPLE_QUESTION = "I love this phone, it works perfectly."
INPUTS = ("text",)
ANSWER_FIELD = "label"
CHAT_FIELDS = ("label", "confidence")

Label = Literal["positive", "negative", "neutral"]


class Sentiment(dspy.Signature):
    """Classify the sentiment of the text."""

    text: str = dspy.InputField()
    label: Label = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="between 0 and 1")


def metric(example, prediction, trace=None) -> bool:
    return getattr(prediction, "label", None) == example.label


def build() -> dspy.Module:
    return dspy.Predict(Sentiment)
