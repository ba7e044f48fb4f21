"""A custom module with a conversation history, an optional context and a question: `forward` only."""

import dspy


class ChatWithHistory(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.Predict("history: dspy.History, context: str, question: str -> answer: str")

    def forward(self, question: str, history: dspy.History | None = None, context: str = ""):
        return self.respond(question=question, history=history or dspy.History(messages=[]), context=context)
