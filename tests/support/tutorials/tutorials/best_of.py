"""`dspy.BestOfN` around a ChainOfThought with a float answer."""

import dspy


def is_a_number(args, prediction) -> float:
    return 1.0 if isinstance(prediction.answer, float) else 0.0


def build():
    return dspy.BestOfN(dspy.ChainOfThought("question -> answer: float"), N=2, reward_fn=is_a_number, threshold=1.0)
