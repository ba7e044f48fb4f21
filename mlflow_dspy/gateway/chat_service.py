"""Chat completions: a parsed request and the program it names in, a completion or its stream out.

As vLLM's `OpenAIServingChat`, this knows nothing of routes or HTTP: the route
parses the body (protocol.ChatCompletionRequest) and picks the program (the
router); this service turns the messages into one `Conversation` (parsed once,
then handed to the program as it is), runs it under the request's deadline, and
answers in OpenAI's shapes. The Responses API (responses.py) runs its
conversations through the same service: the same limits, truncation and errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import dspy
from dspy.utils.exceptions import AdapterParseError
from fastapi.encoders import jsonable_encoder
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.errors import GatewayError, from_program_failure, invalid_request
from mlflow_dspy.gateway.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    FinishReason,
    adapter_prompt,
    completion_id,
    partial_outputs,
)
from mlflow_dspy.gateway.protocol import Delta as DeltaBody
from mlflow_dspy.gateway.protocol import Usage as UsageBody
from mlflow_dspy.gateway.running import deadline, record_usage, sse
from mlflow_dspy.lm_engine.deadline import within
from mlflow_dspy.program.chat import ChatInputError, Conversation, parse_conversation
from mlflow_dspy.runtime.host import Delta, ProgramHost, Usage


class ChatService:
    """Runs conversations for the chat completions and Responses routes."""

    def __init__(self, config: GatewayConfig) -> None:
        self.max_messages = config.max_messages
        self.max_characters = config.max_characters
        self.timeout = config.request_timeout

    # -- the conversation --------------------------------------------------------
    def validate(self, messages: list[dict]) -> Conversation:
        """The request's messages, within the limits, as the one Conversation the program is handed."""
        self.check_limits(messages)
        return _parsed(messages)

    def check_limits(self, messages: list[dict]) -> None:
        """The message and character limits (a 400 naming the one passed)."""
        if len(messages) > self.max_messages:
            raise invalid_request(f"{len(messages)} messages; the limit is {self.max_messages}", param="messages",
                                  code="too_many_messages")
        characters = sum(_characters(m.get("content")) for m in messages if isinstance(m, dict))
        if characters > self.max_characters:
            raise invalid_request(f"the messages hold {characters} characters; the limit is {self.max_characters}",
                                  param="messages", code="too_many_characters")

    # -- running -----------------------------------------------------------------
    async def answer(self, host: ProgramHost, conversation: Conversation, lm_settings: dict,
                     trace: dict | None = None) -> tuple[dspy.Prediction, FinishReason]:
        """The program's prediction and OpenAI's finish_reason for it.

        An answer cut short by the client's own limit is what OpenAI gives then: a
        200 with what was written, finish_reason "length" (max_tokens) or "stop"
        (a stop sequence). Its outputs are what the LM's text holds of them.
        """
        try:
            async with asyncio.timeout(self.timeout):
                prediction = await host.answer(conversation, lm_settings, trace)
        except GatewayError:
            raise
        except Exception as exc:
            finish = self.cut_short(exc, lm_settings)
            if finish is None:
                raise from_program_failure(exc, lm_settings) from None
            return dspy.Prediction(**partial_outputs(exc.lm_response, list(exc.signature.output_fields))), finish
        return prediction, self.finish_reason(host, prediction, lm_settings)

    @staticmethod
    def cut_short(exc: BaseException, lm_settings: dict) -> FinishReason | None:
        """When the client limited the answer (max_tokens, stop) and the program's outputs then failed to
        parse, the limit cut them short: the finish_reason that says so. None for any other failure."""
        if not isinstance(exc, AdapterParseError):
            return None
        if "max_tokens" in lm_settings:
            return "length"
        return "stop" if "stop" in lm_settings else None

    @staticmethod
    def finish_reason(host: ProgramHost, prediction: dspy.Prediction | None, lm_settings: dict) -> FinishReason:
        """"length" when a one-call program's LM wrote all the tokens the client allowed (its answer parsed
        all the same), else "stop"."""
        limit = lm_settings.get("max_tokens")
        if limit is None or prediction is None or len(host.program.program.predictors()) != 1:
            return "stop"
        return "length" if Usage.of(prediction).completion_tokens >= limit else "stop"

    # -- chat completions ----------------------------------------------------------
    async def create(self, host: ProgramHost, body: ChatCompletionRequest, info: dict) -> Response:
        """The completion (or its event stream) for a parsed chat request, on the program it names."""
        settings = body.lm_settings()
        messages = body.message_dicts()
        # A DSPy program calling with its adapter's prompt gets its fields answered in its adapter's format.
        prompt = adapter_prompt(body.messages)
        if prompt is not None:
            self.check_limits(messages)  # the limits hold for what the client sent
            prompt.check(host.program)
            conversation, json_fields = _parsed(prompt.conversation(host.program)), None
        else:
            conversation, json_fields = self.validate(messages), body.json_answer(host.program)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream and prompt is None:
            stream = self._stream(host, conversation, settings, include_usage, info, json_fields)
            return EventSourceResponse(stream, sep="\n", ping=15)
        prediction, finish = await self.answer(host, conversation, settings, info.get("trace"))
        usage = record_usage(info, prediction)
        reasoning = host.reasoning(prediction)
        if prompt is not None:
            # The reasoning travels in the adapter's own format (a `reasoning` field), if the client asks for it.
            content, reasoning = prompt.reply(prompt.values(host.program, prediction, host.content(prediction),
                                                            reasoning)), None
        else:
            content = json_content(host, prediction, json_fields)
        completion = ChatCompletion(
            model=host.name, system_fingerprint=host.fingerprint,
            choices=[Choice(message=AssistantMessage(content=content, reasoning_content=reasoning),
                            finish_reason=finish)],
            usage=UsageBody(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens),
        )
        if body.stream:  # a DSPy client streaming: its adapter parses the whole answer, sent as one chunk
            return EventSourceResponse(_whole_stream(completion, include_usage), sep="\n", ping=15)
        # Serialized by pydantic directly: FastAPI's generic encoder costs more than the rest of the reply.
        return Response(completion.model_dump_json(), media_type="application/json")

    async def _stream(
        self, host: ProgramHost, conversation: Conversation, lm_settings: dict, include_usage: bool, info: dict,
        json_fields: tuple[str, ...] | None = None,
    ) -> AsyncIterator[dict]:
        cid, created = completion_id(), int(time.time())

        def chunk(delta: DeltaBody, finish: str | None = None) -> dict:
            body = ChatCompletionChunk(id=cid, created=created, model=host.name, system_fingerprint=host.fingerprint,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump()
            body.pop("usage")
            body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # only what this chunk carries
            return sse(body)

        def piece(label: str, text: str) -> dict:
            info.setdefault("first_token", time.perf_counter())
            sent[label] += text
            return chunk(DeltaBody(content=text) if label == "content" else DeltaBody(reasoning_content=text))

        yield chunk(DeltaBody(role="assistant", content=""))
        prediction, sent = None, {"content": "", "reasoning": ""}
        try:
            async for item in within(host.stream(conversation, lm_settings, info.get("trace")), deadline(self.timeout)):
                if isinstance(item, Delta):
                    if item.field != "content" or json_fields is None:  # a JSON answer is whole only at the end
                        yield piece(item.field, item.text)
                else:
                    prediction = item
            finish = self.finish_reason(host, prediction, lm_settings)
        except Exception as exc:
            finish = self.cut_short(exc, lm_settings)
            if finish is None:
                # The status line is already sent: the failure travels as an error event.
                yield sse(from_program_failure(exc, lm_settings).body())
                yield sse("[DONE]")
                return
            # Cut short by the client's limit: the rest of what the LM wrote, then finish_reason "length".
            partial = dspy.Prediction(**partial_outputs(exc.lm_response, list(exc.signature.output_fields)))
            texts = {"reasoning": host.reasoning(partial) or ""}
            if json_fields is None and host.program.streams_answer:
                texts["content"] = host.content(partial)
            elif not sent["content"]:
                texts["content"] = json_content(host, partial, json_fields)
            for label, text in texts.items():
                if text.startswith(sent[label]) and len(text) > len(sent[label]):
                    yield piece(label, text[len(sent[label]):])
        if json_fields is not None and prediction is not None:
            yield piece("content", json_content(host, prediction, json_fields))
        yield chunk(DeltaBody(), finish=finish)
        usage = record_usage(info, prediction)
        if include_usage:
            body = ChatCompletionChunk(id=cid, created=created, model=host.name, choices=[],
                                       usage=UsageBody(prompt_tokens=usage.prompt_tokens,
                                                       completion_tokens=usage.completion_tokens,
                                                       total_tokens=usage.total_tokens))
            yield sse(body.model_dump())
        yield sse("[DONE]")


def json_content(host: ProgramHost, prediction: dspy.Prediction, json_fields: tuple[str, ...] | None) -> str:
    """The chat answer; with a JSON response_format, the JSON object of the fields it asks for."""
    if json_fields is None:
        return host.content(prediction)
    return json.dumps(jsonable_encoder({name: prediction.get(name) for name in json_fields}))


async def _whole_stream(completion: ChatCompletion, include_usage: bool) -> AsyncIterator[dict]:
    """A finished completion as the chunks of a stream: the role, the content, the finish, the usage."""
    choice = completion.choices[0]
    for delta, finish in ((DeltaBody(role="assistant", content=""), None),
                          (DeltaBody(content=choice.message.content), None), (DeltaBody(), choice.finish_reason)):
        body = ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump()
        body.pop("usage")
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        yield sse(body)
    if include_usage:
        yield sse(ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                      choices=[], usage=completion.usage).model_dump())
    yield sse("[DONE]")


def _parsed(messages: list[dict]) -> Conversation:
    try:
        return parse_conversation(messages)
    except ChatInputError as exc:
        raise from_program_failure(exc) from None


def _characters(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # parts: count their text
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0
