"""What `/predict` takes and answers for one served program, as pydantic models built from its own fields."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

import dspy
from pydantic import BaseModel, BeforeValidator, Field, TypeAdapter, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from mlflow_dspy.gateway.chat.structured import program_reasons
from mlflow_dspy.gateway.openai_wire import Strict
from mlflow_dspy.program.chat import history_entries
from mlflow_dspy.program.mapping import Field as ProgramField
from mlflow_dspy.program.mapping import fields_model

if TYPE_CHECKING:
    from mlflow_dspy.program.chat import ChatProgram

class Question(Strict):
    """The tutorial's body, `{"text": ...}`: the one text input of a single-input program."""

    text: str = Field(min_length=1)


class PredictResponse(BaseModel):
    status: Literal["success"] = "success"
    data: dict[str, Any]


# A dspy.History input takes dspy's own shape, {"messages": [...]} (entries keyed by the
# signature's fields), or chat turns, [{"role": "user" | "assistant", "content": ...}].
_HISTORY_SCHEMA = {"anyOf": [
    {"type": "object", "properties": {"messages": {"type": "array", "items": {"type": "object"}}},
     "required": ["messages"], "additionalProperties": False,
     "description": "dspy.History: entries keyed by the signature's field names"},
    {"type": "array", "description": "chat turns, paired into history entries",
     "items": {"type": "object", "additionalProperties": False, "required": ["role", "content"],
               "properties": {"role": {"enum": ["user", "assistant"]}, "content": {"type": "string"}}}},
]}


def _history_from_turns(question_field: str, answer_field: str):
    def convert(value: Any) -> Any:
        if not isinstance(value, list):
            return value  # dspy.History validates it
        for i, turn in enumerate(value):
            if not (isinstance(turn, dict) and set(turn) == {"role", "content"}
                    and turn["role"] in ("user", "assistant") and isinstance(turn["content"], str)):
                raise PydanticCustomError("history_turn", "turn [{i}] must be an object with a 'role' ('user' or "
                                          "'assistant') and a string 'content'", {"i": i})
        return dspy.History(messages=history_entries(value, question_field, answer_field))

    return convert


def _readable(annotation: Any) -> bool:
    try:
        TypeAdapter(annotation).json_schema()
    except Exception:
        return False
    return True


class PredictShape:
    """What /predict takes and answers for one served program, as pydantic models.

    Built once per loaded program (validating a request then costs one pydantic
    call). `inputs` has the program's input fields by name, typed as its
    signature declares them; the history and context inputs are optional, as in
    a chat. `outputs` documents the prediction's fields. `text_field` is the
    input the tutorial's `{"text": ...}` fills, when the program has one text
    input (and no input named `text`).
    """

    def __init__(self, program: ChatProgram) -> None:
        mapping = program.mapping
        self.history_field = mapping.history_field
        # A text context the program requires gets "" when the body has none (a chat without system messages).
        context = mapping.input(mapping.context_field) if mapping.context_field else None
        self.blank_context = context.name if context and context.required and context.annotation is str else None
        fields = []
        for field in mapping.inputs:
            if field.name == mapping.history_field:
                convert = _history_from_turns(mapping.question_field or "question", mapping.answer_fields[0])
                annotation = Annotated[dspy.History, BeforeValidator(convert), WithJsonSchema(_HISTORY_SCHEMA)]
                field = dataclasses.replace(field, annotation=annotation, required=False)
            elif field.name == mapping.context_field:
                field = dataclasses.replace(field, required=False)
            elif not _readable(field.annotation):
                field = dataclasses.replace(field, annotation=Any)  # passed on as the JSON it arrives as
            fields.append(field)
        self.required = tuple(f.name for f in fields if f.required)
        self.inputs = fields_model("PredictInputs", fields)
        names = [f.name for f in fields]
        question = mapping.input(mapping.question_field) if mapping.question_field else None
        # The text input a chat's user message fills: empty, there is no question (a 400, as on the chat routes).
        self.question_field = question.name if question and question.annotation is str else None
        self.text_field = self.question_field if "text" not in names else None

        outputs = [f if _readable(f.annotation) else dataclasses.replace(f, annotation=Any) for f in mapping.outputs]
        if program_reasons(program) and "reasoning" not in [f.name for f in outputs]:
            outputs.insert(0, ProgramField("reasoning", str, True, "the program's reasoning"))
        # Extra keys allowed: the prediction may carry fields of other steps.
        self.outputs = fields_model("PredictOutputs", outputs, extra="allow")
        self.response = create_model("PredictResult", status=(Literal["success"], "success"),
                                     data=(self.outputs, ...))

    def arguments(self, model: BaseModel) -> dict[str, Any]:
        """The program's keyword arguments from a validated body: what was sent, and every required input."""
        inputs = {name: getattr(model, name) for name in type(model).model_fields
                  if name in model.model_fields_set or name in self.required}
        if self.history_field and inputs.get(self.history_field) is None:
            inputs[self.history_field] = dspy.History(messages=[])
        if self.blank_context and inputs.get(self.blank_context) is None:
            inputs[self.blank_context] = ""
        return inputs

    def openapi(self, taken: set[str]) -> tuple[dict, dict, dict[str, dict]]:
        """The request body schema, the 200 response schema and the components they refer to.

        Component names that would clash with `taken` get a `Predict` prefix.
        """
        def schemas(template: str) -> tuple[dict, dict, dict]:
            request = self.inputs.model_json_schema(ref_template=template)
            response = self.response.model_json_schema(ref_template=template)
            defs = {**request.pop("$defs", {}), **response.pop("$defs", {})}
            return request, response, defs

        request, response, defs = schemas("#/components/schemas/{model}")
        if set(defs) & taken:
            request, response, defs = schemas("#/components/schemas/Predict{model}")
            defs = {f"Predict{name}": schema for name, schema in defs.items()}
        components = {**defs, "PredictInputs": request, "PredictResult": response}
        body = {"$ref": "#/components/schemas/PredictInputs"}
        if self.text_field:
            components["PredictText"] = Question.model_json_schema()
            body = {"anyOf": [body, {"$ref": "#/components/schemas/PredictText"}]}
        return body, {"$ref": "#/components/schemas/PredictResult"}, components
