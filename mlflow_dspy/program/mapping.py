"""How a chat reaches a program's inputs, and how its outputs become a chat answer.

The rule, read from the program itself:

* **Inputs.** When the program's `forward` names its parameters (a custom
  `dspy.Module`), those are the inputs; a parameter with a default is optional.
  When `forward` takes `**kwargs` (`Predict`, `ChainOfThought`, ...), the inputs
  are the input fields of the program's signature. A parameter's type is its
  annotation, else the type of a predictor's input field of the same name,
  else `str`.
* **Outputs.** A program with its own `signature` (`Predict`, `ChainOfThought`,
  ...) has that signature's output fields. A custom module has the output
  fields of its predictors that no other predictor takes as an input (the
  last step's outputs). `reasoning` is never an answer field.
* **Chat roles.** A `dspy.History` input gets the earlier turns; an input named
  `context` or `system` (or the `context_field`) gets the system messages; the
  last user message fills the one remaining input (or `question_field`). With
  several remaining inputs, the last user message is a JSON object keyed by
  their names, validated against their types.
* **The answer** is the single output field, or `answer_field`; with several
  outputs and none named, the JSON object of all of them (typed values kept).

The mapping is computed once, at log time, and pickled with the program, so a
served model never works it out again from a later version of the code.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import dspy
import pydantic

from mlflow_dspy.program.problems import UserProblem

CONTEXT_NAMES = ("context", "system")
NOT_AN_ANSWER = ("reasoning",)


class MappingProblem(UserProblem, TypeError):
    """A program that cannot be served as chat; the message names the fields."""


@dataclass(frozen=True)
class Field:
    name: str
    annotation: Any = str
    required: bool = True
    description: str = ""

    def type_name(self) -> str:
        annotation = self.annotation
        if typing.get_origin(annotation) is None and isinstance(annotation, type):
            return annotation.__name__
        # Literal["a", "b"], list[int], Optional[int]: the parameters are part of the type.
        return str(annotation).replace("typing.", "")


def _signature(program: dspy.Module) -> type[dspy.Signature] | None:
    signature = getattr(program, "signature", None)
    if inspect.isclass(signature) and issubclass(signature, dspy.Signature):
        return signature
    predictors = program.predictors()
    if len(predictors) == 1 and not _names_forward_parameters(program):
        return predictors[0].signature
    return None


def _names_forward_parameters(program: dspy.Module) -> bool:
    forward = getattr(type(program), "forward", None)
    if forward is None:
        return False
    parameters = list(inspect.signature(forward).parameters.values())[1:]
    return bool(parameters) and all(p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def _predictor_fields(program: dspy.Module, kind: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for predictor in program.predictors():
        for name, info in getattr(predictor.signature, kind).items():
            fields.setdefault(name, info)
    return fields


def _description(info: Any) -> str:
    extra = getattr(info, "json_schema_extra", None) or {}
    desc = extra.get("desc", "")
    return "" if desc.startswith("${") else desc


def input_fields(program: dspy.Module) -> list[Field]:
    signature = _signature(program)
    if signature is not None and not _names_forward_parameters(program):
        return [Field(name, info.annotation, True, _description(info)) for name, info in signature.input_fields.items()]
    forward = type(program).forward
    hints = _hints(forward)
    known = _predictor_fields(program, "input_fields")
    fields = []
    for parameter in list(inspect.signature(forward).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        info = known.get(parameter.name)
        annotation = hints.get(parameter.name) or (info.annotation if info is not None else str)
        fields.append(Field(parameter.name, annotation, parameter.default is parameter.empty,
                            _description(info) if info is not None else ""))
    return fields


def _hints(function: Any) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable forward references: fall back to the predictors' types
        return {}
    hints.pop("return", None)
    return {name: hint for name, hint in hints.items() if hint is not Any}


def output_fields(program: dspy.Module) -> list[Field]:
    signature = getattr(program, "signature", None)
    if inspect.isclass(signature) and issubclass(signature, dspy.Signature):
        items = list(signature.output_fields.items())
    else:
        consumed = {name for p in program.predictors() for name in p.signature.input_fields}
        items = [(n, i) for n, i in _predictor_fields(program, "output_fields").items() if n not in consumed]
    return [Field(name, info.annotation, True, _description(info)) for name, info in items
            if name not in NOT_AN_ANSWER]


def is_history(annotation: Any) -> bool:
    """`dspy.History`, or `dspy.History | None` (an optional history, as tutorials often write it)."""
    if annotation is dspy.History:
        return True
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and members == [dspy.History]


def _fillable(field: Field) -> bool:
    try:
        pydantic.TypeAdapter(field.annotation).json_schema()
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class ChatMapping:
    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]
    question_field: str | None  # filled by the last user message's text; None: a JSON object fills `json_fields`
    json_fields: tuple[str, ...]
    history_field: str | None
    context_field: str | None
    answer_fields: tuple[str, ...]  # one: the chat content is its text; several: one JSON object

    @classmethod
    def of(
        cls,
        program: dspy.Module,
        question_field: str | None = None,
        context_field: str | None = None,
        answer_field: str | None = None,
    ) -> ChatMapping:
        inputs = input_fields(program)
        outputs = output_fields(program)
        names = [f.name for f in inputs]
        for option, value in (("question field", question_field), ("context field", context_field)):
            if value is not None and value not in names:
                raise MappingProblem(f"the {option} {value!r} is not an input of the program; its inputs: "
                                     f"{', '.join(names) or 'none'}")
        if answer_field is not None and answer_field not in [f.name for f in outputs]:
            raise MappingProblem(f"the answer field {answer_field!r} is not an output of the program; its "
                                 f"outputs: {', '.join(f.name for f in outputs) or 'none'}")
        histories = [f.name for f in inputs if is_history(f.annotation)]
        if len(histories) > 1:
            raise MappingProblem(f"a chat has one history, but the program has {len(histories)} history inputs: "
                                 f"{', '.join(histories)}")
        history = histories[0] if histories else None
        context = context_field or next((n for n in CONTEXT_NAMES if n in names and n != question_field), None)
        free = [f for f in inputs if f.name not in (history, context)]
        if question_field is not None:
            question, json_fields = question_field, ()
            left = [f.name for f in free if f.name != question_field and f.required]
            if left:
                raise MappingProblem(f"a chat fills {question_field!r} from the user's message, but the program "
                                     f"also requires {', '.join(left)}; make them optional or leave the question "
                                     "field unset (the message is then a JSON object of all the inputs)")
        elif len(free) == 1:
            question, json_fields = free[0].name, ()
        elif not free:
            raise MappingProblem(f"the program has no input a user's message can fill (inputs: "
                                 f"{', '.join(names) or 'none'})")
        else:
            question, json_fields = None, tuple(f.name for f in free)
        unfillable = [f.name for f in free if f.required and not _fillable(f)]
        if unfillable:
            raise MappingProblem(f"a chat cannot fill the program's required inputs {', '.join(unfillable)}: "
                                 "their types cannot be read from JSON")
        if not outputs:
            raise MappingProblem("the program declares no output fields to answer with")
        answers = (answer_field,) if answer_field else tuple(f.name for f in outputs)
        return cls(tuple(inputs), tuple(outputs), question, json_fields, history, context, answers)

    # -- derived views (not pickled state: cached on first use) ------------------
    @cached_property
    def json_model(self) -> type[pydantic.BaseModel] | None:
        """The pydantic model a JSON user message is validated against (several inputs)."""
        if not self.json_fields:
            return None
        return fields_model("ChatInputs", [f for f in self.inputs if f.name in self.json_fields])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "json_model"}

    def input(self, name: str) -> Field:
        return next(f for f in self.inputs if f.name == name)

    def describe(self) -> dict[str, Any]:
        """A readable summary, stored beside the model (chat_mapping.json) and in its metadata."""
        return {
            "inputs": {f.name: {"type": f.type_name(), "required": f.required} for f in self.inputs},
            "outputs": {f.name: {"type": f.type_name()} for f in self.outputs},
            "question_field": self.question_field,
            "json_fields": list(self.json_fields),
            "history_field": self.history_field,
            "context_field": self.context_field,
            "answer_fields": list(self.answer_fields),
        }


def fields_model(name: str, fields: list[Field], extra: str = "forbid") -> type[pydantic.BaseModel]:
    """A pydantic model with one attribute per field, typed as the program declares it."""
    definitions: dict[str, Any] = {}
    for field in fields:
        default = ... if field.required else None
        definitions[field.name] = (field.annotation, pydantic.Field(default, description=field.description or None))
    # Arbitrary types: an optional input no JSON can fill (a required one is refused
    # by ChatMapping.of) must not stop the model from being built; a value given for
    # it is refused as "not an instance of ...".
    config = pydantic.ConfigDict(extra=extra, arbitrary_types_allowed=True)
    return pydantic.create_model(name, __config__=config, **definitions)


def validation_problem(error: dict, noun: str = "field") -> str:
    """One pydantic error as a user reads it, naming the field: "the input field 'x' is missing"."""
    where = ".".join(str(part) for part in error["loc"]) or "the message"
    if error["type"] == "missing":
        return f"the {noun} {where!r} is missing"
    if error["type"] == "extra_forbidden":
        return f"{where!r} is not an input of this program"
    return f"the {noun} {where!r}: {error['msg']}"
