"""`dspy.ReAct` with two tools."""

import dspy

CAPITALS = {"france": "Paris", "peru": "Lima", "japan": "Tokyo"}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '2 + 2' or '7 * 6'."""
    allowed = set("0123456789+-*/(). ")
    if not set(expression) <= allowed:
        return "only numbers and + - * / ( ) are allowed"
    try:
        return str(eval(expression, {"__builtins__": {}}))  # digits and operators only: checked above
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def lookup(country: str) -> str:
    """The capital city of a country."""
    return CAPITALS.get(country.strip().lower(), "unknown")


def build():
    return dspy.ReAct("question -> answer", tools=[calculator, lookup], max_iters=4)
