"""The JSON schema an embedded answer is decoded under: the one the request asks for, read from DSPy's prompt
when the request asks only for "a JSON object", and bounded where it leaves the answer open.

DSPy 3.4's JSONAdapter sends the output fields' schema (`response_format` json_schema) for most signatures.
For a signature with an open-ended mapping output (`dict[str, Any]`, as ReAct's `next_tool_args`) it asks for
any JSON object (json_object) instead, and describes the fields in the system message it writes: a JSON
template of the fields in order, each a `{name}` placeholder with a note on its type ("must exactly match (no
extra characters) one of: ...", "must adhere to the JSON schema: {...}", ...). `prompt_schema` reads that
template back into a schema (or nothing, if the prompt is not DSPy's), and ReAct's tool list into one choice
of arguments per tool, so `next_tool_args` holds the chosen tool's own parameters.

`bounded` makes the schema decidable by a small model, in a documented way (README, "The embedded LM"):

- an object without declared properties (`dict[str, Any]`, `{"type": "object"}`) holds at most
  `OPEN_MEMBERS` members, keys of at most `KEY_CHARS` characters, and scalar values (a string, a number,
  true, false or null) unless its `additionalProperties` names a schema;
- an object with declared properties holds those only (`{"properties": {}}` is the empty object);
- a list without `maxItems` holds at most `LIST_ITEMS` items;
- a value of any type (`Any`, `{}`) is a scalar;
- the whole answer, when nothing says what it holds, is an open object whose values are scalars, lists of
  scalars or open objects.

An answer under a bounded schema always has a way to end; the scheduler's repetition guard
(`llama_scheduler`) uses that to close a loop instead of decoding it to the token limit.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from typing import Any

OPEN_MEMBERS = 8
KEY_CHARS = 48
LIST_ITEMS = 32

SCALAR: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}

# What DSPy 3.4.1's JSONAdapter writes (dspy/adapters/json_adapter.py, utils.translate_field_type, Tool.__str__).
STRUCTURE_MARK = "Outputs will be a JSON object with the following fields.\n\n"
NOTE = " " * 8 + "# note: the value you produce "
_NOTES = {
    "must be True or False": {"type": "boolean"},
    "must be a single int value": {"type": "integer"},
    "must be a single float value": {"type": "number"},
}
LITERAL_NOTE = "must exactly match (no extra characters) one of: "
ENUM_NOTE = "must be one of: "
SCHEMA_NOTE = "must adhere to the JSON schema: "
REACT_FIELDS = ("next_thought", "next_tool_name", "next_tool_args")
_TOOL_LINE = re.compile(  # "(1) name, whose description is <desc>...</desc>. It takes arguments {...}."
    r"^[ \t]*\((\d+)\) (.+?)(?:, whose description is <desc>.*</desc>)?\. It takes arguments (\{.*\})\.$", re.MULTILINE)


def open_object(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object of at most `OPEN_MEMBERS` members whose values follow `values` (a scalar by default)."""
    return {"type": "object", "additionalProperties": values or SCALAR, "maxProperties": OPEN_MEMBERS}


def any_object() -> dict[str, Any]:
    """The whole answer when nothing says what it holds."""
    return open_object({"anyOf": [*SCALAR["anyOf"], {"type": "array", "items": SCALAR, "maxItems": LIST_ITEMS},
                                  open_object()]})


# -- reading DSPy's prompt ------------------------------------------------------------------------------------
def prompt_schema(system: str) -> dict[str, Any] | None:
    """The output fields DSPy's JSONAdapter described in a system message, as a JSON schema (None when the
    message holds no such description, or one this cannot read)."""
    at = system.find(STRUCTURE_MARK)
    if at < 0:
        return None
    try:
        template, _ = json.JSONDecoder().raw_decode(system, at + len(STRUCTURE_MARK))
    except ValueError:
        return None
    if not isinstance(template, dict) or not template:
        return None
    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for name, placeholder in template.items():
        head = "{" + name + "}"
        if not isinstance(placeholder, str) or not placeholder.startswith(head):
            return None
        schema = _field_schema(placeholder[len(head):], _annotation(system, name))
        if schema is None:
            return None
        for key, definition in schema.pop("$defs", {}).items():  # hoisted: their $refs point at the root
            if defs.setdefault(key, definition) != definition:
                return None
        properties[name] = schema
    schema = {"type": "object", "properties": properties, "required": list(properties),
              "additionalProperties": False}
    if defs:
        schema["$defs"] = defs
    return _react_choices(schema, system) or schema


def _field_schema(note: str, annotation: str | None) -> dict[str, Any] | None:
    if not note:
        return {"type": "string"}
    if not note.startswith(NOTE):
        return None
    said = note[len(NOTE):]
    if said in _NOTES:
        return dict(_NOTES[said])
    if said.startswith(LITERAL_NOTE):
        return {"enum": _literal_values(said[len(LITERAL_NOTE):], annotation)}
    if said.startswith(ENUM_NOTE):
        return {"enum": said[len(ENUM_NOTE):].split("; ")}
    if said.startswith(SCHEMA_NOTE):
        try:
            schema = json.loads(said[len(SCHEMA_NOTE):])
        except ValueError:
            return None
        return schema if isinstance(schema, dict) else None
    return None


def _annotation(system: str, name: str) -> str | None:
    """A field's annotation as DSPy lists it ("2. `label` (Literal['a', 'b']): ...")."""
    match = re.search(r"^\d+\. `" + re.escape(name) + r"` \((.*)\):", system, re.MULTILINE)
    return match.group(1) if match else None


def _literal_values(listed: str, annotation: str | None) -> list[Any]:
    """A Literal's values: from its annotation when that reads back as the same list (it keeps their types and
    any "; " inside one), else the note's "; "-separated text."""
    if annotation and annotation.startswith("Literal[") and annotation.endswith("]"):
        try:
            values = ast.literal_eval("[" + annotation[len("Literal["):-1] + "]")
        except (ValueError, SyntaxError):
            values = None
        if isinstance(values, list) and values and "; ".join(str(v) for v in values) == listed:
            return values
    return listed.split("; ")


def _react_choices(schema: dict[str, Any], system: str) -> dict[str, Any] | None:
    """ReAct's step (next_thought, next_tool_name, next_tool_args) as one choice per tool listed in the
    prompt, each with that tool's own arguments; None unless the tools listed are exactly the names offered."""
    properties = schema["properties"]
    if tuple(properties) != REACT_FIELDS or "enum" not in properties["next_tool_name"]:
        return None
    tools: dict[str, dict[str, Any]] = {}
    for number, (index, name, args) in enumerate(_TOOL_LINE.findall(system), start=1):
        try:
            parameters = ast.literal_eval(args)
        except (ValueError, SyntaxError):
            return None
        if int(index) != number or name in tools or not isinstance(parameters, dict) \
                or not all(isinstance(p, dict) for p in parameters.values()):
            return None
        tools[name] = parameters
    if list(tools) != properties["next_tool_name"]["enum"]:
        return None
    choices = []
    for name, parameters in tools.items():
        args = {"type": "object", "properties": parameters, "additionalProperties": False,
                "required": [p for p, spec in parameters.items() if "default" not in spec]}
        choices.append({**schema, "properties": {**properties, "next_tool_name": {"const": name},
                                                 "next_tool_args": args}})
    chosen: dict[str, Any] = {"anyOf": [{k: v for k, v in choice.items() if k != "$defs"} for choice in choices]}
    if "$defs" in schema:
        chosen["$defs"] = schema["$defs"]
    return chosen


# -- bounds -------------------------------------------------------------------------------------------------
def bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the bounds above (a copy); `{}` (any JSON object) becomes `any_object()`."""
    if not schema:
        return any_object()
    return _bound(copy.deepcopy(schema))


def _bound(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    for key in ("$defs", "definitions"):
        if isinstance(node.get(key), dict):
            node[key] = {name: _bound(sub) for name, sub in node[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(node.get(key), list):
            node[key] = [_bound(sub) for sub in node[key]]
    if _is_any(node):
        return dict(SCALAR)
    kind = node.get("type")
    if kind == "object" or (kind is None and ("properties" in node or "additionalProperties" in node)):
        properties, extra = node.get("properties"), node.get("additionalProperties")
        if isinstance(properties, dict) and (properties or extra in (None, False)):  # declared (maybe none)
            node["properties"] = {name: _bound(sub) for name, sub in properties.items()}
            node["additionalProperties"] = False
            return node
        values = _bound(extra) if isinstance(extra, dict) and extra else None
        bounded_object = open_object(values)
        if "maxProperties" in node:
            bounded_object["maxProperties"] = min(node["maxProperties"], OPEN_MEMBERS)
        return bounded_object
    if kind == "array" or (kind is None and "items" in node):
        node["items"] = _bound(node.get("items") or {})
        node.setdefault("maxItems", LIST_ITEMS)
        return node
    return node


def _is_any(node: dict[str, Any]) -> bool:
    """A schema that allows any value: `{}`, or one that only describes (a title, a description, a default)."""
    return not (set(node) - {"title", "description", "default", "examples"})


# -- what closing an answer may have to write ------------------------------------------------------------
def closing_answer(schema: dict[str, Any]) -> Any:
    """The longest answer that closing one under a (bounded) schema may have to write from its start: each
    required field at its shortest (an empty string or list, 0, an object of its required fields), the
    longest value where the model chooses (an enum, one of several alternatives). The scheduler keeps the
    tokens it takes, of the budget, for closing."""
    return _closing(schema, schema.get("$defs") or {}, 0)


def _size(value: Any) -> int:
    return len(json.dumps(value))


def _closing(node: Any, defs: dict[str, Any], depth: int) -> Any:
    if not isinstance(node, dict) or depth > 16:
        return None
    if "$ref" in node:
        return _closing(defs.get(node["$ref"].rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return max(node["enum"], key=_size)
    choices = node.get("anyOf") or node.get("oneOf")
    if choices:
        return max((_closing(choice, defs, depth + 1) for choice in choices), key=_size)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind == "object" or "properties" in node:
        properties = node.get("properties") or {}
        return {name: _closing(properties[name], defs, depth + 1) for name in node.get("required", [])
                if name in properties}
    if kind == "array":
        return [_closing(node.get("items") or {}, defs, depth + 1)] * int(node.get("minItems", 0))
    if kind == "string":
        return "x" * int(node.get("minLength", 0))
    return {"integer": 0, "number": 0, "boolean": False}.get(kind)
