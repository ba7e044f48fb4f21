"""Summarize a ticket, then classify the summary (the first step's output feeds the second)."""

from typing import Literal

import dspy

Category = Literal["billing", "bug", "other"]


class Summarize(dspy.Signature):
    """Summarize the support ticket in one sentence."""

    ticket: str = dspy.InputField()
    summary: str = dspy.OutputField()


class Classify(dspy.Signature):
    """Route the ticket to a queue, following the policy."""

    summary: str = dspy.InputField()
    priority: int = dspy.InputField()
    policy: str = dspy.InputField()
    category: Category = dspy.OutputField()


class Triage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict(Summarize)
        self.classify = dspy.Predict(Classify)

    def forward(self, ticket: str, priority: int = 1, policy: str = "") -> dspy.Prediction:
        summary = self.summarize(ticket=ticket).summary
        return self.classify(summary=summary, priority=priority, policy=policy)
