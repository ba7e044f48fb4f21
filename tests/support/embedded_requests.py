"""The LM requests the four example programs make for 24 conversations, as the embedded engine receives them.

tests/test_embedded_serving.py replays these prompts through the embedded model's scheduler (cache on and
off, alone and together, ...). They were made once by running the programs on the embedded model with a
64-token cap on answers; an answer cut there does not parse, and DSPy's JSON adapter then asks again in
JSON-object mode, so some conversations made two requests: both are kept, in order. They live in
tests/data/embedded_requests.json so that no test run spends minutes generating them.

Regenerate the file (after a change to DSPy, its adapters or the example programs; several minutes):

    .venv/bin/python -m tests.support.embedded_requests --capture

The file cannot drift silently: `rebuild` makes each conversation's requests again without the model (an
engine that answers text no adapter can parse, so DSPy asks again as it did when the model's answer was cut)
and test_embedded_serving compares them with the file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Config, Message, Request, TextPart

from mlflow_dspy.lm_engine.llama_engine import EMBEDDED_MODEL, LlamaCppEngine
from mlflow_dspy.lm_engine.llama_scheduler import Outcome
from mlflow_dspy.lm_engine.select import adapter_for
from tests.support.examples import example_chat

DATA = Path(__file__).resolve().parents[1] / "data" / "embedded_requests.json"
MAX_TOKENS = 64  # the cap on answers when the requests were captured (it is in every request's config)

# Per example program: single questions and multi-turn conversations (an earlier exchange, then a question).
CONVERSATIONS = {
    "qa": [["What is 2 + 2?"], ["What is the capital of France?"], ["Who wrote Hamlet?"], ["Name a primary color."],
           ["What is 3 + 5?", "8", "And 3 + 6?"], ["What is the largest ocean?", "The Pacific.", "And the smallest?"]],
    "assistant": [["What can you help me with?"], ["My name is Ada. Hi!"], ["Suggest a name for a cat."],
                  ["I live in Oslo.", "Nice!", "Where do I live?"], ["I like tea.", "Noted.", "What do I like?"],
                  ["Tell me a fun fact."]],
    "rag": [["How long is the warranty on a Nimbus frame?"], ["How do I return a product?"],
            ["What does shipping cost?"], ["Is there a warranty?", "Yes.", "How long is it?"],
            ["Can I pay by card?"], ["Where are you based?", "See the site.", "Do you ship abroad?"]],
    "classify": [["I love this phone, it works perfectly."], ["The screen broke after a day."],
                 ["It is a phone."], ["Terrible support, never again."],
                 ["Fine, I guess.", "Noted.", "Actually great!"], ["Best purchase this year!"]],
}


def messages_of(turns: list[str]) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


# -- Request <-> JSON ------------------------------------------------------------------------------------------
_DEFAULT_CONFIG = Config()


def to_json(request: Request) -> dict[str, Any]:
    """A request as plain JSON: model, system text, (role, text) messages, the config fields that are set."""
    assert isinstance(request.system, str | None) and not request.tools, request
    messages = []
    for message in request.messages:
        [part] = message.parts
        assert isinstance(part, TextPart) and not message.continuation, message
        messages.append({"role": message.role, "text": part.text})
    config = {}
    for field in dataclasses.fields(Config):
        value = getattr(request.config, field.name)
        if value != getattr(_DEFAULT_CONFIG, field.name):
            config[field.name] = list(value) if isinstance(value, tuple) else value
    json.dumps(config)  # only plain values: anything else would not come back equal
    return {"model": request.model, "system": request.system, "messages": messages, "config": config}


def from_json(data: dict[str, Any]) -> Request:
    config = {name: tuple(value) if isinstance(value, list) else value for name, value in data["config"].items()}
    messages = tuple(Message(role=m["role"], parts=(TextPart(m["text"]),)) for m in data["messages"])
    return Request(model=data["model"], messages=messages, system=data["system"], config=Config(**config))


# -- making them -----------------------------------------------------------------------------------------------
class _Recording(LlamaCppEngine):
    """The embedded engine, keeping every request DSPy hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def generate(self, request, cancel=None):
        self.requests.append(request)
        return super().generate(request, cancel)


class _Unparseable(_Recording):
    """The embedded engine's face to DSPy (its capabilities, hence the same prompts), with no model behind it:
    every answer is text no adapter parses."""

    def generate(self, request, cancel=None):
        self.requests.append(request)
        yield "not an answer in any format"
        yield Outcome(finish_reason="stop", prompt_tokens=1, completion_tokens=1)


def _requests_made(engine: _Recording, program: str, turns: list[str]) -> list[Request]:
    lm = dspy.LM(EMBEDDED_MODEL, engine=engine, cache=False, max_tokens=MAX_TOKENS)
    start = len(engine.requests)
    # An answer a program cannot parse still made its request.
    with dspy.context(lm=lm, adapter=adapter_for(lm)), contextlib.suppress(Exception):
        example_chat(program)(messages=messages_of(turns))
    return engine.requests[start:]


def capture() -> list[dict[str, Any]]:
    """Each conversation's requests, from real runs on the embedded model (minutes)."""
    engine = _Recording()
    return [{"program": program, "turns": turns,
             "requests": [to_json(r) for r in _requests_made(engine, program, turns)]}
            for program, conversations in CONVERSATIONS.items() for turns in conversations]


def rebuild(program: str, turns: list[str]) -> list[Request]:
    """The requests DSPy makes today for a conversation whose answers never parse (no model: instant)."""
    return _requests_made(_Unparseable(), program, turns)


def load() -> list[dict[str, Any]]:
    return json.loads(DATA.read_text())


def requests() -> list[Request]:
    """Every captured request, in the order they were made."""
    return [from_json(r) for conversation in load() for r in conversation["requests"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", action="store_true", help=f"run the embedded model and rewrite {DATA}")
    args = parser.parse_args()
    if not args.capture:
        parser.error("nothing to do without --capture")
    captured = capture()
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(captured, indent=1) + "\n")
    print(f"{sum(len(c['requests']) for c in captured)} requests of {len(captured)} conversations -> {DATA}")


if __name__ == "__main__":
    main()
