"""The Responses event stream of one answer, as the official openai SDK parses it: output items opened as
their text arrives (the reasoning first, if the program reasons, then the message), each event numbered."""

from __future__ import annotations

import json
from typing import Any

from mlflow_dspy.gateway.errors import GatewayError
from mlflow_dspy.gateway.responses.wire import (
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
    step_items,
)
from mlflow_dspy.runtime.run import ToolStep, Usage


class ResponseEvents:
    """The Responses event stream of one answer: output items opened as their text arrives (the reasoning
    first, if the program reasons, then the message), each event numbered."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.number = 0
        self.sent = {"reasoning": "", "content": ""}
        self.items: list[OutputItem] = []
        self.called = False  # the forced call was made: the answer is that call, not a message
        self.open: OutputMessage | ReasoningItem | None = None

    def send(self, kind: str, **fields: Any) -> dict:
        data = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return {"event": kind, "data": json.dumps(data)}

    def delta(self, label: str, text: str) -> list[dict]:
        events: list[dict] = []
        if label == "reasoning":
            if any(isinstance(i, OutputMessage) for i in self.items):
                return events  # the answer has begun: the response's reasoning item is already closed
            if self.open is None:
                events += self._open(ReasoningItem(status="in_progress"), ReasoningText(text=""))
            self.sent["reasoning"] += text
            events.append(self._part_event("response.reasoning_text.delta", delta=text))
            return events
        if not isinstance(self.open, OutputMessage):
            events += self._close(incomplete=False)
            events += self._open(OutputMessage(status="in_progress"), OutputText(text=""))
        self.sent["content"] += text
        events.append(self._part_event("response.output_text.delta", delta=text, logprobs=[]))
        return events

    def step(self, step: ToolStep) -> list[dict]:
        """A tool the program ran: its call and its output, each an item added and done."""
        events = self._close(incomplete=False)
        for item in step_items(step):
            self.items.append(item)
            index = len(self.items) - 1
            events.append(self.send("response.output_item.added", output_index=index, item=item.model_dump()))
            events.append(self.send("response.output_item.done", output_index=index, item=item.model_dump()))
        return events

    def call(self, name: str, arguments: str) -> list[dict]:
        """A function_call item: the call the client forced, its arguments the program's outputs."""
        events = self._close(incomplete=False)
        self.called = True
        item = FunctionCallItem(name=name, arguments="", status="in_progress")
        self.items.append(item)
        index = len(self.items) - 1
        events.append(self.send("response.output_item.added", output_index=index, item=item.model_dump()))
        events.append(self.send("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                                delta=arguments))
        item.arguments, item.status = arguments, "completed"
        events.append(self.send("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                arguments=arguments, name=name))
        events.append(self.send("response.output_item.done", output_index=index, item=item.model_dump()))
        return events

    def finish(self, usage: Usage, incomplete: bool) -> list[dict]:
        events: list[dict] = []
        if not self.called and not any(isinstance(i, OutputMessage) for i in self.items):
            # An empty answer is still a message.
            events += self._close(incomplete=False)
            events += self._open(OutputMessage(status="in_progress"), OutputText(text=""))
        events += self._close(incomplete)
        self.response.finish(self.items, usage, incomplete)
        kind = "response.incomplete" if incomplete else "response.completed"
        events.append(self.send(kind, response=self.response.model_dump()))
        return events

    def failed(self, error: GatewayError) -> list[dict]:
        """An `error` event with the gateway's error, then `response.failed`."""
        events = [self.send("error", code=error.code or error.type, message=error.message, param=error.param)]
        self.response.status = "failed"
        code = "rate_limit_exceeded" if error.status == 429 else "server_error" if error.status >= 500 \
            else "invalid_prompt"
        self.response.error = ResponseError(code=code, message=error.message)
        self.response.output = self.items
        events.append(self.send("response.failed", response=self.response.model_dump()))
        return events

    def _open(self, item: OutputMessage | ReasoningItem, part: OutputText | ReasoningText) -> list[dict]:
        self.open = item
        self.items.append(item)
        events = [self.send("response.output_item.added", output_index=len(self.items) - 1,
                            item=item.model_dump())]
        item.content.append(part)
        events.append(self._part_event("response.content_part.added", part=part.model_dump()))
        return events

    def _close(self, incomplete: bool) -> list[dict]:
        item = self.open
        if item is None:
            return []
        self.open = None
        part = item.content[0]
        if isinstance(item, ReasoningItem):
            part.text = self.sent["reasoning"]
            done = [self._part_event("response.reasoning_text.done", text=part.text, item=item)]
        else:
            part.text = self.sent["content"]
            done = [self._part_event("response.output_text.done", text=part.text, logprobs=[], item=item)]
        item.status = "incomplete" if incomplete and isinstance(item, OutputMessage) else "completed"
        done.append(self._part_event("response.content_part.done", part=part.model_dump(), item=item))
        done.append(self.send("response.output_item.done", output_index=self.items.index(item),
                              item=item.model_dump()))
        return done

    def _part_event(self, kind: str, item: OutputMessage | ReasoningItem | None = None, **fields: Any) -> dict:
        item = item or self.open
        return self.send(kind, item_id=item.id, output_index=self.items.index(item), content_index=0, **fields)
