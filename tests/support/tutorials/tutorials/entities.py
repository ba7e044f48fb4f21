"""ChainOfThought with `list[str]` in and out: entity extraction."""

import dspy


class ExtractEntities(dspy.Signature):
    """List the people and places named in the sentences."""

    sentences: list[str] = dspy.InputField()
    entities: list[str] = dspy.OutputField()


def build():
    return dspy.ChainOfThought(ExtractEntities)
