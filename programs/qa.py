"""`qa`: the tutorial's program, ChainOfThought("question -> answer"), with the
conversation so far as a `dspy.History` (as DSPy's history tutorial writes it),
so a chat's follow-up question is answered in the light of the earlier turns."""

import dspy


def build() -> dspy.Module:
    return dspy.ChainOfThought("question, history: dspy.History -> answer")
