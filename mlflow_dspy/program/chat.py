"""Adapt OpenAI chat `messages` to a DSPy program's inputs.

MLflow's chat task calls `model(messages)` with a positional list of
`{"role", "content"}` dicts, which bare `dspy.Predict`/`ChainOfThought`
refuse. `ChatProgram` is the `dspy.Module` that sits in between:

* the last user message fills the question input (or, for a program with
  several inputs, is a JSON object of them, validated against their types);
* earlier user/assistant turns become a `dspy.History`, for programs whose
  signature has a history input (other programs answer the last turn alone);
* system (and developer) messages become the program's context input when
  it has one, else they are appended to the instructions for this call;
* anything else is refused with a `ChatInputError` that names the problem.

Which input is which is the `ChatMapping` (mapping.py), computed at log time.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import pydantic
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
)
from pydantic import ValidationError

from mlflow_dspy.program.failures import failure_of
from mlflow_dspy.program.mapping import ChatMapping, Field, validation_problem
from mlflow_dspy.program.work import run_in_thread

log = logging.getLogger("mlflow_dspy.program")

SYSTEM_ROLES = ("system", "developer")
TURN_ROLES = ("user", "assistant")
KNOWN_ROLES = SYSTEM_ROLES + TURN_ROLES


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
    characters: int = 0  # of text in every message, as sent (the parts of one message not joined yet)

    @classmethod
    def of(cls, messages: Sequence[Message], collection: str = "messages") -> Conversation:
        """The conversation some messages hold, checked once: known roles, text content, a user message
        to answer, and nothing after it but system messages. A ChatInputError names the message (`where`)."""
        if not messages:
            raise ChatInputError(f"{collection} must not be empty")
        parsed: list[tuple[str, str]] = []
        characters = 0
        for message in messages:
            if message.role not in KNOWN_ROLES:
                raise ChatInputError(f"{message.where}.role {message.role!r} is not supported; use one of "
                                     f"{', '.join(KNOWN_ROLES)}")
            if message.content is None:
                raise ChatInputError(f"{message.content_where} is missing")
            texts = _texts(message.content, message.content_where)
            characters += sum(len(text) for text in texts)
            parsed.append((message.role, "\n".join(texts)))

        user_indexes = [i for i, (role, _) in enumerate(parsed) if role == "user"]
        if not user_indexes:
            raise ChatInputError(f"{collection} has no user message to answer")
        last_user = user_indexes[-1]
        if not parsed[last_user][1].strip():
            raise ChatInputError(f"{messages[last_user].content_where} is empty: there is no question to answer")
        trailing = [i for i, (role, _) in enumerate(parsed) if i > last_user and role == "assistant"]
        if trailing:
            raise ChatInputError(
                f"{messages[trailing[0]].where} is an assistant message after the last user message; "
                "the conversation must end with the user turn to answer"
            )
        return cls(
            question=parsed[last_user][1],
            turns=[{"role": r, "content": c} for r, c in parsed[:last_user] if r in TURN_ROLES],
            system=[c for r, c in parsed if r in SYSTEM_ROLES],
            characters=characters,
        )


@dataclass(frozen=True)
class Message:
    """One message of a conversation as a client sent it, and where in the request it was
    (`messages[3]`, `input[2]`, `instructions`) for the errors that name it."""

    role: Any
    content: Any  # a string, a list of {"type": "text"} parts, or None when missing
    where: str
    content_at: str | None = None  # where its text was, when not `<where>.content`

    @property
    def content_where(self) -> str:
        return self.content_at or f"{self.where}.content"


def _valid_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatInputError(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None
    return text


def _texts(content: Any, where: str) -> list[str]:
    """A message's text: the string, or the text of each of its parts."""
    if isinstance(content, str):
        return [_valid_text(content, where)]
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
        return texts
    raise ChatInputError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def parse_conversation(messages: Any) -> Conversation:
    """OpenAI-style chat messages (dicts, as `mlflow models serve` and batch files give them) as a
    Conversation; a Conversation is returned as it is (a server parses a request's messages once)."""
    if isinstance(messages, Conversation):
        return messages
    if hasattr(messages, "tolist"):  # numpy arrays from a pandas row
        messages = messages.tolist()
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatInputError(f"messages must be a list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatInputError(f"messages[{i}] must be an object with 'role' and 'content'")
    return Conversation.of([Message(m.get("role"), m.get("content"), f"messages[{i}]")
                            for i, m in enumerate(messages)])


# A program without a dspy.History input sees earlier turns folded into its question text, in this form.
FOLDED_HEAD = "Earlier in this conversation:"
FOLDED_QUESTION = "The question now:"
NO_HISTORY_JSON = ("this program reads one JSON user message of its inputs and has no dspy.History input, so it "
                   "cannot see earlier turns: send the last user message alone, or give the program a dspy.History "
                   "input (README: How a chat reaches your program)")


def folded(turns: list[dict[str, str]], question: str) -> str:
    """The earlier turns and the question as one text, for a program that has no history input."""
    lines = [f"{turn['role']}: {turn['content']}" for turn in turns]
    return "\n".join([FOLDED_HEAD, *lines, "", FOLDED_QUESTION, question])


def history_entries(turns: list[dict[str, str]], question_field: str, answer_field: str) -> list[dict[str, str]]:
    """Pair user and assistant turns into the signature-shaped dicts `dspy.History` expects."""
    entries: list[dict[str, str]] = []
    for turn in turns:
        if turn["role"] == "user" or not entries or answer_field in entries[-1]:
            entries.append({})
        key = question_field if turn["role"] == "user" else answer_field
        entries[-1][key] = (entries[-1].get(key, "") + "\n" + turn["content"]).strip()
    return entries


def read_json_inputs(mapping: ChatMapping, text: str, where: str) -> dict[str, Any]:
    """The inputs a JSON user message carries, typed; a ChatInputError names the field that is wrong."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ChatInputError(f"{where} must be a JSON object with the program's inputs "
                             f"({', '.join(mapping.json_fields)}), since the program takes several")
    try:
        model = mapping.json_model.model_validate(data)
    except ValidationError as exc:
        raise ChatInputError(f"{where}: {validation_problem(exc.errors()[0], 'input field')}") from None
    return {name: getattr(model, name) for name in mapping.json_fields if name in model.model_fields_set
            or mapping.input(name).required}


NO_HISTORY_TYPED = ("this program's input {name!r} is a {type}, read from the last user message, and the program "
                    "has no dspy.History input, so it cannot see earlier turns: send the last user message alone, "
                    "or give the program a dspy.History input (README: How a chat reaches your program)")


def question_value(field: Field, text: str, where: str) -> Any:
    """The last user message as the program's one input. A `str` input gets its text; a typed one (list[str],
    int, Literal, a Pydantic model) the first of these its type accepts: the JSON the message holds, that JSON
    under the input's name ({"sentences": [...]}), the text itself, and for a list the text as its one item.
    A ChatInputError says what the input takes otherwise."""
    if field.annotation is str:
        return text
    adapter = type_adapter(field.annotation)
    candidates: list[Any] = []
    try:
        data = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(data, dict) and set(data) == {field.name}:
            candidates.append(data[field.name])
        candidates.append(data)
    candidates.append(text)
    if typing.get_origin(field.annotation) in (list, tuple, set, frozenset):
        candidates.append([text])
    first: ValidationError | None = None
    for candidate in candidates:
        try:
            return adapter.validate_python(candidate)
        except ValidationError as exc:
            first = first or exc
    problem = first.errors()[0]["msg"] if first is not None else "not readable"
    raise ChatInputError(f"{where} must hold the program's input {field.name!r}, a {field.type_name()} (as JSON, "
                         f"or its text): {problem}")


def takes_text(field: Field) -> bool:
    """Whether an input takes any text as it is (str, str | None): earlier turns can be folded into it."""
    if field.annotation is str:
        return True
    try:
        return type_adapter(field.annotation).validate_python("text") == "text"
    except ValidationError:
        return False


_ADAPTERS: dict[int, tuple[Any, pydantic.TypeAdapter]] = {}


def type_adapter(annotation: Any) -> pydantic.TypeAdapter:
    """A pydantic TypeAdapter for an input's type, built once (building one costs about a millisecond)."""
    known = _ADAPTERS.get(id(annotation))
    if known is None or known[0] is not annotation:
        known = _ADAPTERS[id(annotation)] = (annotation, pydantic.TypeAdapter(annotation))
    return known[1]


class ProgramFailed(MlflowException):
    """A program run that failed, as `mlflow models serve` answers it: the right status, no traceback."""

    ERROR_CODES = {400: INVALID_PARAMETER_VALUE, 429: REQUEST_LIMIT_EXCEEDED, 504: DEADLINE_EXCEEDED}

    @classmethod
    def of(cls, exc: Exception) -> MlflowException:
        if isinstance(exc, MlflowException):
            return exc  # ChatInputError and MLflow's own: already a clear answer
        failure = failure_of(exc)
        if failure is None:
            log.error("the program failed", exc_info=exc)
            return cls(f"the program failed ({type(exc).__name__}); the server log has the details",
                       error_code=INTERNAL_ERROR)
        return cls(failure.message, error_code=cls.ERROR_CODES.get(failure.status, INTERNAL_ERROR))


class ChatProgram(dspy.Module):
    """Chat front for any DSPy program: its `mapping` says which input each part of a chat fills.

    One answer field is shown as its text, several as one JSON object.
    """

    def __init__(self, program: dspy.Module, mapping: ChatMapping | None = None) -> None:
        super().__init__()
        self.program = program
        self.mapping = mapping or ChatMapping.of(program)

    # The names the runtime and the gateway read.
    @property
    def question_field(self) -> str | None:
        return self.mapping.question_field

    @property
    def answer_fields(self) -> tuple[str, ...]:
        return self.mapping.answer_fields

    @property
    def streams_answer(self) -> bool:
        """Token streaming follows one text field as the LM writes it."""
        fields = self.mapping.answer_fields
        if len(fields) != 1:
            return False
        output = next((f for f in self.mapping.outputs if f.name == fields[0]), None)
        return output is None or output.annotation is str

    def prepare(self, messages: Any) -> tuple[dspy.Module, dict[str, Any]]:
        conversation = parse_conversation(messages)
        mapping = self.mapping
        if mapping.question_field:
            question_field = mapping.input(mapping.question_field)
            kwargs: dict[str, Any] = {
                mapping.question_field: question_value(question_field, conversation.question, "the last user message")}
        else:
            kwargs = read_json_inputs(mapping, conversation.question, "the last user message")
        if mapping.history_field:
            question = mapping.question_field or "question"
            kwargs[mapping.history_field] = dspy.History(
                messages=history_entries(conversation.turns, question, mapping.answer_fields[0])
            )
        elif conversation.turns:  # no history input: the earlier turns are never dropped in silence
            if not mapping.question_field:
                raise ChatInputError(NO_HISTORY_JSON)
            if not takes_text(question_field):
                raise ChatInputError(NO_HISTORY_TYPED.format(name=question_field.name,
                                                             type=question_field.type_name()))
            kwargs[mapping.question_field] = folded(conversation.turns, conversation.question)
        program = self.for_call()
        if conversation.system:
            system = "\n\n".join(conversation.system)
            if mapping.context_field:
                kwargs[mapping.context_field] = system
            else:
                program = _with_extra_instructions(program, system)
        return program, kwargs

    def for_call(self) -> dspy.Module:
        """The program one call runs: the shared one, or a copy of it when one of its modules keeps state
        between calls. DSPy's BestOfN and Refine count their failures down in `fail_count` on the module
        itself, so on a shared program every failed attempt would make every later request fail sooner."""
        stateful = self.__dict__.get("_stateful")
        if stateful is None:
            stateful = self.__dict__["_stateful"] = any(
                hasattr(module, "fail_count") for _, module in [("", self.program), *self.program.named_sub_modules()])
        return self.program.deepcopy() if stateful else self.program

    def forward(self, messages: Any) -> dspy.Prediction:
        program, kwargs = self.prepare(messages)
        try:
            return program(**kwargs)
        except Exception as exc:
            # `mlflow models serve` calls this: a failure it would answer with a traceback
            # (and a 400 that blames the client) becomes an error that says what happened.
            raise ProgramFailed.of(exc) from exc

    async def aforward(self, messages: Any) -> dspy.Prediction:
        program, kwargs = self.prepare(messages)
        return await call_async(program, kwargs)


async def call_async(program: dspy.Module, kwargs: dict[str, Any]) -> dspy.Prediction:
    """Run a program natively async when it can be (`Predict`, `ChainOfThought`, modules with an
    `aforward`); a module with only a `forward` runs on a program thread (program/work.py), with this
    task's settings, and the work it leaves behind if the caller goes away is tracked there."""
    if hasattr(type(program), "aforward"):
        return await program.acall(**kwargs)
    return await run_in_thread(program, **kwargs)


def _with_extra_instructions(program: dspy.Module, text: str) -> dspy.Module:
    # A per-call copy: changing the shared program's signatures would leak one
    # request's system prompt into every concurrent request.
    copy = program.deepcopy()
    for _, predictor in copy.named_predictors():
        signature = predictor.signature
        predictor.signature = signature.with_instructions(f"{signature.instructions}\n\n{text}".strip())
    return copy
