"""Triage a support ticket: summarize it, then route it with a typed category and priority."""

from typing import Literal

import dspy

from helpdesk.helpers import clean_ticket

Category = Literal["billing", "technical", "other"]


class Summarize(dspy.Signature):
    """Summarize the support ticket in one short sentence."""

    ticket: str = dspy.InputField()
    summary: str = dspy.OutputField()


class Route(dspy.Signature):
    """Route the summarized ticket to a team and give it a priority from 1 (low) to 3 (urgent)."""

    summary: str = dspy.InputField()
    category: Category = dspy.OutputField()
    priority: int = dspy.OutputField(desc="1, 2 or 3")


class Triage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict(Summarize)
        self.route = dspy.Predict(Route)

    def forward(self, ticket: str) -> dspy.Prediction:
        summary = self.summarize(ticket=clean_ticket(ticket)).summary
        return self.route(summary=summary)

    async def aforward(self, ticket: str) -> dspy.Prediction:
        summary = (await self.summarize.acall(ticket=clean_ticket(ticket))).summary
        return await self.route.acall(summary=summary)
