"""The DSPy programs this project can log and serve, by name.

Each entry is a module with `build() -> dspy.Module`, a `DESCRIPTION`, an
`EXAMPLE_QUESTION` (the input example MLflow stores with the model), `INPUTS`
(the input fields of its examples) and `metric(example, prediction, trace)`;
optionally `QUESTION_FIELD`, `ANSWER_FIELD` and `CHAT_FIELDS` for the chat wrapper.
Train and dev sets live in data/<name>/ (see programs/datasets.py).
`chat_program(name)` wraps the program in `ChatProgram` so it answers OpenAI
chat `messages`.
"""

from __future__ import annotations

from types import ModuleType

from programs import assistant, classify, qa, rag
from programs.chat import ChatInputError, ChatProgram, parse_conversation

REGISTRY: dict[str, ModuleType] = {"qa": qa, "assistant": assistant, "rag": rag, "classify": classify}


def program_spec(name: str) -> ModuleType:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown program {name!r}; known programs: {', '.join(sorted(REGISTRY))}") from None


def wrap_for_chat(name: str, program) -> ChatProgram:
    """`program` (built by, or compiled from, the `name` entry) wrapped for chat."""
    spec = program_spec(name)
    return ChatProgram(
        program,
        question_field=getattr(spec, "QUESTION_FIELD", None),
        answer_field=getattr(spec, "ANSWER_FIELD", None),
        chat_fields=getattr(spec, "CHAT_FIELDS", None),
    )


def chat_program(name: str) -> ChatProgram:
    return wrap_for_chat(name, program_spec(name).build())


__all__ = [
    "REGISTRY",
    "ChatInputError",
    "ChatProgram",
    "chat_program",
    "parse_conversation",
    "program_spec",
    "wrap_for_chat",
]
