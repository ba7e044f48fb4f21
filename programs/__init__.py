"""The DSPy programs this project can log and serve, by name.

Each entry is a module with `build() -> dspy.Module`, a `DESCRIPTION` and an
`EXAMPLE_QUESTION` (the input example MLflow stores with the model).
`chat_program(name)` wraps the program in `ChatProgram` so it answers OpenAI
chat `messages`.
"""

from __future__ import annotations

from types import ModuleType

from programs import qa
from programs.chat import ChatInputError, ChatProgram, parse_conversation

REGISTRY: dict[str, ModuleType] = {"qa": qa}


def program_spec(name: str) -> ModuleType:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown program {name!r}; known programs: {', '.join(sorted(REGISTRY))}") from None


def chat_program(name: str) -> ChatProgram:
    return ChatProgram(program_spec(name).build())


__all__ = ["REGISTRY", "ChatInputError", "ChatProgram", "chat_program", "parse_conversation", "program_spec"]
