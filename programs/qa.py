"""`qa`: the tutorial's program, ChainOfThought("question -> answer")."""

import dspy

DESCRIPTION = "Question answering with chain-of-thought (the DSPy deployment tutorial's program)."
EXAMPLE_QUESTION = "What is 2 + 2?"


def build() -> dspy.Module:
    return dspy.ChainOfThought("question -> answer")
