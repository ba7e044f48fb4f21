"""DSPy as a client: a DSPy program whose LM is this gateway, recognised by its adapter's prompt.

A DSPy program whose LM is this gateway sends the prompt its adapter (ChatAdapter, JSONAdapter)
formats: a system message that lists the input and output fields, and a user message of
`[[ ## field ## ]]` blocks. Served to the program as it is, the program would answer that prompt as
if it were the question. So the gateway reads the fields out of it, runs the program on them, and
answers in the format the adapter parses.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dspy

from mlflow_dspy.gateway.errors import unsupported_parameter
from mlflow_dspy.program.chat import Conversation, parse_conversation
from mlflow_dspy.runtime.host import as_text

if TYPE_CHECKING:
    from mlflow_dspy.program.chat import ChatProgram

_ADAPTER_MARKS = ("Your input fields are:", "Your output fields are:", "All interactions will be structured")
_LISTED_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)
_REQUEST_TAIL = re.compile(r"\n\nRespond with (?:the corresponding output fields|a JSON object).*\Z", re.DOTALL)


@dataclasses.dataclass
class AdapterPrompt:
    """What a DSPy client asked: its input fields' values, the output fields it parses, and in which format."""

    inputs: dict[str, str]
    outputs: list[str]
    json: bool

    def conversation(self, program: ChatProgram) -> Conversation:
        """The chat the served program answers: the client's inputs in the places its mapping reads them from."""
        mapping = program.mapping
        inputs = dict(self.inputs)
        messages = []
        if mapping.context_field and mapping.context_field in inputs and len(inputs) > 1:
            messages.append({"role": "system", "content": inputs.pop(mapping.context_field)})
        if mapping.question_field is None:
            question = json.dumps({name: _json_or_text(value) for name, value in inputs.items()})
        elif mapping.question_field in inputs:
            question = inputs[mapping.question_field]
        elif len(inputs) == 1:
            question = next(iter(inputs.values()))
        else:
            question = "\n\n".join(f"{name}: {value}" for name, value in inputs.items())
        messages.append({"role": "user", "content": question})
        return parse_conversation(messages)

    def reply(self, values: dict[str, Any]) -> str:
        """The answer as the client's adapter parses it: `[[ ## field ## ]]` blocks, or a JSON object."""
        if self.json:
            return json.dumps(values, default=str)
        blocks = [f"[[ ## {name} ## ]]\n{as_text(value)}" for name, value in values.items()]
        return "\n\n".join([*blocks, "[[ ## completed ## ]]"])

    def check(self, program: ChatProgram) -> None:
        """A 400 when several of the outputs the client asks for are not the program's: which of them
        would get the program's answer?"""
        available = {f.name for f in program.mapping.outputs} | {"reasoning"}
        unmatched = [name for name in self.outputs if name not in available]
        if len(unmatched) > 1:
            raise unsupported_parameter(
                f"the DSPy client asks for the outputs {', '.join(self.outputs)}, but this program "
                f"writes {', '.join(program.mapping.answer_fields)}: use a signature whose outputs "
                "are the program's, or one output (it gets the program's answer)", "messages")

    def values(self, program: ChatProgram, prediction: dspy.Prediction, answer: str,
               reasoning: str | None) -> dict[str, Any]:
        """Each output the client asks for: the program's field of that name, else the program's chat answer
        (`check` made sure at most one such field is asked for), `reasoning` its reasoning."""
        values: dict[str, Any] = {}
        for name in self.outputs:
            if name in prediction:
                value = prediction[name]
            elif name == "reasoning":
                value = reasoning or ""
            else:
                value = answer
            if hasattr(value, "model_dump"):
                value = value.model_dump(mode="json")
            values[name] = value if self.json else as_text(value)
        return values


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text of its parts (chat's `text`, the Responses API's `input_text`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                     for p in content):
        return "".join(p["text"] for p in content)
    return None


def adapter_prompt(messages: Sequence[Any]) -> AdapterPrompt | None:
    """The fields of a DSPy adapter's prompt, when `messages` (each with a `role` and a `content`: a chat
    request's, or the Responses API's read as messages) is one; None otherwise."""
    if not messages:
        return None
    system, last = messages[0], messages[-1]
    system_text, last_text = _text(system.content), _text(last.content)
    if (system.role != "system" or last.role != "user" or system_text is None or last_text is None
            or not last_text.startswith("[[ ## ") or not all(mark in system_text for mark in _ADAPTER_MARKS)):
        return None
    head = system_text.split(_ADAPTER_MARKS[2], 1)[0]
    listed_inputs, _, listed_outputs = head.partition(_ADAPTER_MARKS[1])
    input_names = _LISTED_FIELD.findall(listed_inputs)
    outputs = _LISTED_FIELD.findall(listed_outputs)
    if not input_names or not outputs:
        return None
    # Split at the markers of the listed inputs only: a value may hold other `[[ ## ... ## ]]` text.
    blocks = re.compile(r"\[\[ ## (" + "|".join(map(re.escape, input_names)) + r") ## \]\]\n")
    parts = blocks.split(last_text)
    inputs = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    if not inputs:
        return None
    last_name = list(inputs)[-1]
    inputs[last_name] = _REQUEST_TAIL.sub("", inputs[last_name])
    inputs = {name: value.strip() for name, value in inputs.items()}
    return AdapterPrompt(inputs, outputs, json="Respond with a JSON object" in last_text)
