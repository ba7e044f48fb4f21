"""`qa`: the tutorial's program, ChainOfThought("question -> answer")."""

import dspy


def build() -> dspy.Module:
    return dspy.ChainOfThought("question -> answer")
