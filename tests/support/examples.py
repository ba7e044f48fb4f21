"""The bundled examples as tests use them: through the same public path as a user's program."""

from __future__ import annotations

from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.project import examples
from mlflow_dspy.program.target import open_target

EXAMPLE_NAMES = sorted(examples())


def example_chat(name: str) -> ChatProgram:
    """An example program, built from its file and wrapped for chat with its mapping."""
    return open_target(name).chat()
