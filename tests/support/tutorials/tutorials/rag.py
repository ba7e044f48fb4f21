"""A custom RAG module with a keyword retriever."""

import dspy

DOCUMENTS = [
    "The warranty covers parts and labour for two years from the date of purchase.",
    "Returns are accepted within 30 days with the original receipt.",
    "Support is open from 9 to 17, Monday to Friday.",
]


def retrieve(question: str, k: int = 2) -> list[str]:
    words = {w.strip("?.,").lower() for w in question.split() if len(w) > 3}
    scored = sorted(DOCUMENTS, key=lambda d: -len(words & {w.strip(".,").lower() for w in d.split()}))
    return scored[:k]


class RAG(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.ChainOfThought("context: list[str], question -> answer")

    def forward(self, question: str):
        return self.respond(context=retrieve(question), question=question)
