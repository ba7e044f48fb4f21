"""Adapt OpenAI chat `messages` to a DSPy program's inputs.

MLflow's chat task calls `model(messages)` with a positional list of
`{"role", "content"}` dicts, which bare `dspy.Predict`/`ChainOfThought`
refuse. `ChatProgram` is the `dspy.Module` that sits in between:

* the last user message becomes the question;
* earlier user/assistant turns become a `dspy.History`, for programs whose
  signature has a history input (other programs answer the last turn alone);
* system (and developer) messages become the program's `context` input when
  it has one, else they are appended to the instructions for this call;
* anything else is refused with a `ChatInputError` that names the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

SYSTEM_ROLES = ("system", "developer")
TURN_ROLES = ("user", "assistant")
KNOWN_ROLES = SYSTEM_ROLES + TURN_ROLES
CONTEXT_FIELDS = ("context", "system")


class ChatInputError(MlflowException, ValueError):
    """A conversation the program cannot answer.

    An `MlflowException` with INVALID_PARAMETER_VALUE, so `mlflow models serve`
    answers 400 with this message (and no stack trace); a `ValueError` for
    everyone else.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass
class Conversation:
    question: str
    turns: list[dict[str, str]] = field(default_factory=list)  # earlier user/assistant turns, in order
    system: list[str] = field(default_factory=list)


def _valid_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatInputError(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None
    return text


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _valid_text(content, where)
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        if not content:
            raise ChatInputError(f"{where} is an empty list of parts")
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = kind if isinstance(kind, str) else type(part).__name__
                raise ChatInputError(f"{where}[{i}] is a '{shown}' part; only text content is supported")
            texts.append(_valid_text(part["text"], f"{where}[{i}].text"))
        return "\n".join(texts)
    raise ChatInputError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def parse_conversation(messages: Any) -> Conversation:
    """Validate OpenAI-style chat messages and split them into question, turns and system text."""
    if hasattr(messages, "tolist"):  # numpy arrays from a pandas row
        messages = messages.tolist()
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatInputError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatInputError("messages must not be empty")

    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatInputError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise ChatInputError(
                f"messages[{i}].role {role!r} is not supported; use one of {', '.join(KNOWN_ROLES)}"
            )
        if "content" not in message or message["content"] is None:
            raise ChatInputError(f"messages[{i}].content is missing")
        parsed.append((role, _text(message["content"], f"messages[{i}].content")))

    user_indexes = [i for i, (role, _) in enumerate(parsed) if role == "user"]
    if not user_indexes:
        raise ChatInputError("messages has no user message to answer")
    last_user = user_indexes[-1]
    if not parsed[last_user][1].strip():
        raise ChatInputError(f"messages[{last_user}].content is empty: there is no question to answer")
    trailing = [i for i, (role, _) in enumerate(parsed) if i > last_user and role == "assistant"]
    if trailing:
        raise ChatInputError(
            f"messages[{trailing[0]}] is an assistant message after the last user message; "
            "the conversation must end with the user turn to answer"
        )
    return Conversation(
        question=parsed[last_user][1],
        turns=[{"role": r, "content": c} for r, c in parsed[:last_user] if r in TURN_ROLES],
        system=[c for r, c in parsed if r in SYSTEM_ROLES],
    )


def _history_entries(turns: list[dict[str, str]], question_field: str, answer_field: str) -> list[dict[str, str]]:
    """Pair user and assistant turns into the signature-shaped dicts `dspy.History` expects."""
    entries: list[dict[str, str]] = []
    for turn in turns:
        if turn["role"] == "user" or not entries or answer_field in entries[-1]:
            entries.append({})
        key = question_field if turn["role"] == "user" else answer_field
        entries[-1][key] = (entries[-1].get(key, "") + "\n" + turn["content"]).strip()
    return entries


class ChatProgram(dspy.Module):
    """Chat front for any DSPy program that answers a question-like input.

    The fields are read from the program's signature (or its first
    predictor's); a program whose forward() differs from its predictors'
    inputs names them: `question_field`, `answer_field`. `chat_fields` are the
    outputs a chat answer shows: one field is shown as its text, several as
    one JSON object.
    """

    def __init__(
        self,
        program: dspy.Module,
        question_field: str | None = None,
        answer_field: str | None = None,
        chat_fields: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.program = program
        signature = self._signature()
        inputs = list(signature.input_fields)
        outputs = [name for name in signature.output_fields if name != "reasoning"]
        self.history_field = next(
            (n for n, f in signature.input_fields.items() if f.annotation is dspy.History), None
        )
        self.context_field = next((n for n in CONTEXT_FIELDS if n in inputs), None)
        if question_field is None:
            others = [n for n in inputs if n not in (self.history_field, self.context_field)]
            if len(others) != 1:
                raise TypeError(
                    f"a chat program needs exactly one question input besides history/context, got {others}"
                )
            question_field = others[0]
        self.question_field = question_field
        self.answer_field = answer_field or ("answer" if "answer" in outputs else outputs[-1] if outputs else "answer")
        self.chat_fields = tuple(chat_fields or (self.answer_field,))
        annotation = signature.output_fields.get(self.answer_field)
        # Token streaming follows one text field as the LM writes it.
        self.streams_answer = self.chat_fields == (self.answer_field,) and (
            annotation is None or annotation.annotation is str
        )

    def _signature(self) -> type[dspy.Signature]:
        predictors = self.program.predictors()
        if not predictors:
            raise TypeError("a chat program wraps a DSPy program with at least one predictor")
        # ChainOfThought and friends keep their user-facing signature on the
        # program itself; a plain Predict is its own predictor.
        return getattr(self.program, "signature", None) or predictors[0].signature

    def prepare(self, messages: Any) -> tuple[dspy.Module, dict[str, Any]]:
        conversation = parse_conversation(messages)
        kwargs: dict[str, Any] = {self.question_field: conversation.question}
        if self.history_field:
            kwargs[self.history_field] = dspy.History(
                messages=_history_entries(conversation.turns, self.question_field, self.answer_field)
            )
        program = self.program
        if conversation.system:
            system = "\n\n".join(conversation.system)
            if self.context_field:
                kwargs[self.context_field] = system
            else:
                program = _with_extra_instructions(program, system)
        return program, kwargs

    def forward(self, messages: Any) -> dspy.Prediction:
        program, kwargs = self.prepare(messages)
        return program(**kwargs)

    async def aforward(self, messages: Any) -> dspy.Prediction:
        program, kwargs = self.prepare(messages)
        return await program.acall(**kwargs)


def _with_extra_instructions(program: dspy.Module, text: str) -> dspy.Module:
    # A per-call copy: changing the shared program's signatures would leak one
    # request's system prompt into every concurrent request.
    copy = program.deepcopy()
    for _, predictor in copy.named_predictors():
        signature = predictor.signature
        predictor.signature = signature.with_instructions(f"{signature.instructions}\n\n{text}".strip())
    return copy
