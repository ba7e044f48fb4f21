"""What a client asks an answer to be, and whether the program can give it that way: its usual text, a JSON
object of some of its outputs (`response_format` / Responses' `text.format`), or a call of a function whose
parameters are the program's outputs (a forced tool: how pydantic-ai, instructor and LangChain ask for
structured output by default).

A DSPy program answers with its outputs and calls no tool of the client's. Tools the client sends with
`tool_choice` absent, "auto" or "none" are accepted, and the program answers in text, as a model that chose
not to call one. A forced function is answered as a call of it, holding the program's typed outputs, when
its parameters are those outputs (the check `json_schema` passes); any other forced tool is refused, saying
why.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mlflow_dspy.gateway.errors import unsupported_parameter
from mlflow_dspy.gateway.openai_wire import NO_TOOLS, unsupported

if TYPE_CHECKING:
    from mlflow_dspy.program.chat import ChatProgram


@dataclass(frozen=True)
class AnswerShape:
    """How an answer goes out: the program's usual content (`fields` None), or the JSON object of `fields`;
    as the arguments of a call of `tool` when the client forced one."""

    fields: tuple[str, ...] | None = None
    tool: str | None = None


USUAL = AnswerShape()


def answers_an_object(program: ChatProgram) -> bool:
    """Whether the program's chat answer is a JSON object: several answer fields, or one typed as an object."""
    fields = program.mapping.answer_fields
    if len(fields) > 1:
        return True
    output = next((f for f in program.mapping.outputs if f.name == fields[0]), None)
    annotation = output.annotation if output else str
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and (issubclass(origin, (dict, BaseModel)) or dataclasses.is_dataclass(origin))


def program_reasons(program: ChatProgram) -> bool:
    """Whether one of the program's steps writes a `reasoning` output."""
    return any("reasoning" in p.signature.output_fields for p in program.program.predictors())


def json_object(program: ChatProgram) -> AnswerShape:
    """A JSON object: the usual answer when it already is one, else the object of the answer fields
    (`{"answer": "..."}` for a one-field program)."""
    return USUAL if answers_an_object(program) else AnswerShape(tuple(program.mapping.answer_fields))


def schema_fields(schema: dict[str, Any] | None, program: ChatProgram, what: str, param: str) -> tuple[str, ...]:
    """The fields a JSON schema asks for, when they are the program's answer fields (optionally with its other
    outputs and `reasoning`); a 400 naming `param` otherwise. `what` names the schema in the message."""
    schema = schema or {}
    mapping = program.mapping
    answers = tuple(mapping.answer_fields)
    properties = schema.get("properties")
    available = [f.name for f in mapping.outputs]
    if program_reasons(program):
        available.append("reasoning")
    wanted = "(" + ", ".join(answers) + (", optionally " + ", ".join(a for a in available if a not in answers)
                                         if len(available) > len(answers) else "") + ")"
    if schema.get("type", "object") != "object" or not isinstance(properties, dict) or not properties:
        raise unsupported_parameter(f"{what} cannot be honoured: its schema must be an object with properties, the "
                                    f"program's outputs {wanted}", param)
    requested = tuple(properties)
    extra = [name for name in requested if name not in available]
    missing = [name for name in answers if name not in requested]
    required = schema.get("required") or []
    if extra or missing or not set(required) <= set(requested):
        problems = [f"it asks for {', '.join(extra)}" if extra else "",
                    f"it leaves out {', '.join(missing)}" if missing else "",
                    "its required fields are not among its properties" if not set(required) <= set(requested)
                    else ""]
        raise unsupported_parameter(f"{what} differs from the program's outputs {wanted}: "
                                    f"{'; '.join(p for p in problems if p)}", param)
    return requested


# -- tools ---------------------------------------------------------------------------------
def function_of(tool: Any) -> tuple[str | None, dict[str, Any] | None]:
    """(name, parameters) of a function tool as chat (`{"type": "function", "function": {...}}`), the
    Responses API (`{"type": "function", "name": ...}`) or the deprecated `functions` write it; (None, None)
    for a tool that is not a function (a client's hosted tool)."""
    if not isinstance(tool, dict):
        return None, None
    if tool.get("type", "function") != "function":
        return None, None
    function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = function.get("name")
    parameters = function.get("parameters")
    return (name if isinstance(name, str) else None), (parameters if isinstance(parameters, dict) else None)


def chosen_name(choice: Any) -> str | None:
    """The function a tool_choice names (chat's `{"type": "function", "function": {"name"}}`, Responses'
    `{"type": "function", "name"}`, the deprecated `{"name"}`), if it names one."""
    if not isinstance(choice, dict):
        return None
    function = choice.get("function") if isinstance(choice.get("function"), dict) else choice
    name = function.get("name")
    return name if isinstance(name, str) else None


def check_tools(tools: list | None, choice: Any, tools_param: str, choice_param: str) -> None:
    """What can be checked before the program is known: a choice that asks for a tool call needs tools, and a
    named one must be among them, and a function tool names its function (a 400 naming the field otherwise)."""
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise unsupported(f"{tools_param}[{i}] is not an object: a tool is "
                              '{"type": "function", "function": {"name": ..., "parameters": {...}}}', tools_param)
        if tool.get("type", "function") == "function" and not isinstance(function_of(tool)[0], str):
            raise unsupported(f"{tools_param}[{i}] is a function tool without a function name: a tool is "
                              '{"type": "function", "function": {"name": ..., "parameters": {...}}}', tools_param)
    if choice in (None, "none", "auto"):
        return
    if not tools:
        raise unsupported(f"{choice_param} {json.dumps(choice)} asks for a tool call, but no {tools_param} are "
                          f"sent: {NO_TOOLS}", choice_param)
    name = chosen_name(choice)
    if choice != "required" and name is None:
        raise unsupported(f"{choice_param} {json.dumps(choice)} is not \"none\", \"auto\", \"required\" or a "
                          "named function", choice_param)
    names = [function_of(tool)[0] for tool in tools]
    if name is not None and name not in names:
        raise unsupported(f"{choice_param} names the function '{name}', which is not among the {tools_param} sent "
                          f"({', '.join(repr(n) for n in names if n)})", choice_param)


def forced_tool(tools: list | None, choice: Any, program: ChatProgram, choice_param: str) -> AnswerShape | None:
    """The call the client forces (`required`, or a named function), when a function's parameters are the
    program's outputs; None when nothing is forced; a 400 that says why when it cannot be given."""
    if choice in (None, "none", "auto") or not tools:
        return None
    name = chosen_name(choice)
    candidates = [function_of(tool) for tool in tools]
    candidates = [(n, p) for n, p in candidates if n is not None and (name is None or n == name)]
    fitting, reasons = [], []
    for candidate, parameters in candidates:
        try:
            fitting.append(AnswerShape(schema_fields(parameters, program, f"the function '{candidate}'",
                                                     choice_param), candidate))
        except Exception as exc:  # a GatewayError saying why this one does not fit
            reasons.append(getattr(exc, "message", str(exc)))
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        raise unsupported_parameter(f"{choice_param} \"required\" leaves the choice between the functions "
                                    f"{', '.join(s.tool for s in fitting)}, whose parameters are all the program's "
                                    "outputs: name one", choice_param)
    why = reasons[0] if len(reasons) == 1 else "; ".join(reasons) or "no function tool was sent"
    raise unsupported_parameter(f"{choice_param} forces a tool call, but this model is a DSPy program: it can only "
                                f"call a function whose parameters are its own outputs ({why})", choice_param)
