"""`qa`: the tutorial's program, ChainOfThought("question -> answer")."""

import dspy

from programs.metrics import contains_answer

DESCRIPTION = "Question answering with chain-of-thought (the DSPy deployment tutorial's program)."
EXAMPLE_QUESTION = "What is 2 + 2?"
INPUTS = ("question",)
metric = contains_answer


def build() -> dspy.Module:
    return dspy.ChainOfThought("question -> answer")
