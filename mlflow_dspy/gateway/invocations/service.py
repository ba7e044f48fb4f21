"""`/invocations`: what `mlflow models serve` answers for a DSPy chat model, byte for byte, in every
input format it takes, with its error keys beside the OpenAI error object. The messages are read into
one `Conversation` and the request's run (runtime/run.py) collected; its errors are never raised."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from mlflow_dspy.gateway.chat.service import ConversationLimits
from mlflow_dspy.gateway.chat.wire import ChatCompletionRequest
from mlflow_dspy.gateway.context import RequestContext
from mlflow_dspy.gateway.errors import (
    GatewayError,
    invalid_body,
    invalid_request,
    json_object,
    unsupported_parameter,
)
from mlflow_dspy.program.chat import parse_conversation
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Failed, failure, truncated


class InvocationsService:
    def __init__(self, limits: ConversationLimits) -> None:
        self.limits = limits  # the chat routes' own

    async def create(self, ctx: RequestContext, host: ProgramHost, raw: bytes) -> Response:
        """The DSPy flavor's answer for a raw /invocations body; errors in MLflow's shape, never raised."""
        try:
            messages, settings = invocation_messages(raw, host.name)
            self.limits.check_count(len(messages))
            conversation = parse_conversation(messages)
            self.limits.check_characters(conversation.characters)
        except GatewayError as error:
            return mlflow_style(error)
        except Exception as exc:
            return mlflow_style(GatewayError.of(failure(exc)))
        outcome = await ctx.start_run(host, conversation, lm_settings=settings).outcome()
        if isinstance(outcome, Failed):
            return mlflow_style(GatewayError.of(outcome.failure))
        if outcome.cut_short:  # the DSPy flavor has no way to say "cut short": the client allows a longer answer
            return mlflow_style(GatewayError.of(truncated(settings)))
        # Byte for byte what the DSPy flavor's chat wrapper returns through `mlflow models serve`.
        message = {"role": "assistant", "content": json.dumps(outcome.prediction.toDict())}
        payload = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        return Response(json.dumps(payload), media_type="application/json")


def invocation_messages(raw: bytes, served_name: str) -> tuple[list[dict], dict[str, Any]]:
    """The conversation, and its LM settings, in any input format `mlflow models serve` takes for a chat model.

    The chat format ({"messages": ..., "temperature": ...}) is checked field by
    field like /v1/chat/completions. Like the DSPy flavor, a DataFrame-shaped
    input answers its first row only.
    """
    payload = json_object(raw)
    if "messages" in payload:
        if isinstance(payload["messages"], list) and all(isinstance(m, dict) for m in payload["messages"]):
            _mlflow_schema(payload["messages"])  # MLflow's own message first, as `mlflow models serve` words it
            try:
                chat = ChatCompletionRequest.model_validate(payload)
            except ValidationError as exc:
                raise invalid_body(exc.errors()) from None
            if chat.model and chat.model != served_name:
                raise invalid_request(f"model '{chat.model}' is not served here", param="model",
                                      code="model_not_found")
            _no_forced_call(chat)
            return payload["messages"], chat.lm_settings()
        messages = payload["messages"]
    elif isinstance(payload.get("dataframe_records"), list) and payload["dataframe_records"]:
        messages = _row_messages(payload["dataframe_records"][0])
    elif isinstance(payload.get("dataframe_split"), dict):
        split = payload["dataframe_split"]
        columns, data = split.get("columns"), split.get("data")
        if not (isinstance(columns, list) and "messages" in columns and isinstance(data, list) and data
                and isinstance(data[0], list) and len(data[0]) == len(columns)):
            raise invalid_request("dataframe_split needs a 'messages' column and a row", param="dataframe_split")
        messages = data[0][columns.index("messages")]
    elif "inputs" in payload or "instances" in payload:
        rows = payload.get("inputs", payload.get("instances"))
        messages = _row_messages(rows[0] if isinstance(rows, list) and rows else rows)
    else:
        raise invalid_request("send {\"messages\": [...]} (or dataframe_records, dataframe_split, inputs, instances)",
                              param="messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages must be a non-empty list", param="messages")
    _mlflow_schema(messages)
    return messages, {}


def _no_forced_call(chat: ChatCompletionRequest) -> None:
    """Tools are answered in text here as on chat; a call the client forces cannot be, in MLflow's format."""
    for param, choice in (("tool_choice", chat.tool_choice), ("function_call", chat.function_call)):
        if choice not in (None, "none", "auto"):
            raise unsupported_parameter(f"{param} forces a tool call, but /invocations answers in MLflow's chat "
                                        "format (the program's outputs as JSON in the message content): send the "
                                        "request to /v1/chat/completions to have the call", param)


def _mlflow_schema(messages: list) -> None:
    """What `mlflow models serve` enforces from the chat signature before the model runs."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise invalid_request(f"messages[{i}] needs string 'role' and 'content' (the model's input schema)",
                                  param="messages")


def _row_messages(row: Any) -> Any:
    if not isinstance(row, dict) or "messages" not in row:
        raise invalid_request("each row needs a 'messages' field", param="messages")
    return row["messages"]


def mlflow_style(error: GatewayError) -> JSONResponse:
    """/invocations errors carry MLflow's keys (error_code, message) and the OpenAI error object."""
    body = error.body()
    code = "BAD_REQUEST" if error.status < 500 else "INTERNAL_ERROR"
    return JSONResponse({"error_code": code, "message": error.message, **body}, status_code=error.status,
                        headers=error.headers)
