"""The corpus of malformed requests: every one must get a 4xx that names the problem.

Each case is a name, the raw body bytes and any extra headers, so invalid
JSON, invalid UTF-8 and odd headers can be sent exactly as written. The same
corpus goes to the gateway's /v1/chat/completions, /invocations and /predict,
and to `mlflow models serve` /invocations (tests/test_malformed_corpus.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

USER = {"role": "user", "content": "What is 2 + 2?"}


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = "application/json"


def _json(name: str, payload: Any, **headers: str) -> Case:
    return Case(name, json.dumps(payload).encode(), headers)


def _chat(name: str, **fields: Any) -> Case:
    return _json(name, {"messages": [USER], **fields})


def _deep(levels: int) -> bytes:
    return b'{"messages": ' + b"[" * levels + b"]" * levels + b"}"


def corpus() -> list[Case]:
    cases = [
        # -- not JSON, not UTF-8 -------------------------------------------
        Case("empty body", b""),
        Case("invalid json: truncated", b'{"messages": [{"role": "user", "content": "hi"'),
        Case("invalid json: single quotes", b"{'messages': []}"),
        Case("invalid json: trailing comma", b'{"messages": [],}'),
        Case("invalid json: bare word", b"hello"),
        Case("invalid json: NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        Case("invalid utf-8 in content", b'{"messages": [{"role": "user", "content": "\xff\xfe bad"}]}'),
        Case("invalid utf-8 everywhere", bytes(range(128, 256))),
        Case("lone surrogate escape", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        Case("utf-16 body", json.dumps({"messages": [USER]}).encode("utf-16")),
        Case("json null", b"null"),
        Case("json array", b"[1, 2, 3]"),
        Case("json string", b'"messages"'),
        Case("json number", b"42"),
        # -- messages: missing, empty, wrong type ----------------------------
        _json("no messages", {}),
        _json("empty messages", {"messages": []}),
        _json("messages null", {"messages": None}),
        _json("messages a string", {"messages": "What is 2 + 2?"}),
        _json("messages an object", {"messages": USER}),
        _json("messages a number", {"messages": 7}),
        _json("message a string", {"messages": ["hi"]}),
        _json("message null", {"messages": [None]}),
        _json("message without role", {"messages": [{"content": "hi"}]}),
        _json("message without content", {"messages": [{"role": "user"}]}),
        _json("role null", {"messages": [{"role": None, "content": "hi"}]}),
        _json("content null", {"messages": [{"role": "user", "content": None}]}),
        _json("role a number", {"messages": [{"role": 1, "content": "hi"}]}),
        _json("content a number", {"messages": [{"role": "user", "content": 4}]}),
        _json("content an object", {"messages": [{"role": "user", "content": {"text": "hi"}}]}),
        _json("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
        _json("tool role", {"messages": [{"role": "tool", "content": "hi"}]}),
        _json("no user turn", {"messages": [{"role": "system", "content": "be brief"}]}),
        _json("only assistant", {"messages": [{"role": "assistant", "content": "4"}]}),
        _json("assistant after the last user turn", {"messages": [USER, {"role": "assistant", "content": "4"}]}),
        _json("unknown field in a message", {"messages": [{**USER, "mood": "happy"}]}),
        # -- content as parts ------------------------------------------------
        _json("image part", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
        _json("audio part", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
        _json("parts of numbers", {"messages": [{"role": "user", "content": [1, 2, 3]}]}),
        _json("part without type", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
        _json("empty parts", {"messages": [{"role": "user", "content": []}]}),
        _json("part text null", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}),
        # -- numbers out of range, wrong types ---------------------------------
        _chat("max_tokens negative", max_tokens=-1),
        _chat("max_tokens zero", max_tokens=0),
        _chat("max_tokens absurd", max_tokens=10**12),
        _chat("max_tokens a string", max_tokens="many"),
        _chat("max_tokens a float", max_tokens=1.5),
        _chat("max_completion_tokens negative", max_completion_tokens=-5),
        _chat("temperature negative", temperature=-1),
        _chat("temperature absurd", temperature=1e9),
        _chat("temperature a string", temperature="hot"),
        _chat("top_p zero", top_p=0),
        _chat("top_p above one", top_p=1.5),
        _chat("n two", n=2),
        _chat("n negative", n=-1),
        _chat("n absurd", n=10**6),
        _chat("stop list too long", stop=["a", "b", "c", "d", "e"]),
        _chat("stop empty string", stop=""),
        _chat("stop a number", stop=3),
        _chat("stream a string", stream="yes"),
        _chat("presence_penalty absurd", presence_penalty=100),
        _chat("seed a string", seed="lucky"),
        # -- unknown or unsupported fields -------------------------------------
        _chat("unknown top-level field", frobnicate=True),
        _chat("a function tool without its function", tools=[{"type": "function"}]),
        _chat("a function without a name", functions=[{"description": "f"}]),
        _chat("logit_bias", logit_bias={"50256": -100}),
        _chat("response_format json_schema", response_format={"type": "json_schema", "json_schema": {}}),
        _chat("stream_options unknown key", stream=True, stream_options={"include_everything": True}),
        _chat("model of another server", model="gpt-4o"),
        # -- size and depth ----------------------------------------------------
        _json("100k-character message", {"messages": [{"role": "user", "content": "x" * 100_000}]}),
        _json("1000 messages", {"messages": [USER] * 1000}),
        Case("10 MB body", json.dumps({"messages": [{"role": "user", "content": "y" * (10 << 20)}]}).encode()),
        Case("nesting 10,000 levels deep", _deep(10_000)),
        Case("nesting 100,000 levels deep", _deep(100_000)),
        # -- headers -----------------------------------------------------------
        Case("content-type text/plain", json.dumps({"messages": [USER]}).encode(), content_type="text/plain"),
        Case("content-type missing", json.dumps({"messages": [USER]}).encode(), content_type=None),
        Case("content-type form", b"messages=hi", content_type="application/x-www-form-urlencoded"),
        Case("content-encoding gzip, body plain", json.dumps({"messages": [USER]}).encode(),
             {"Content-Encoding": "gzip"}),
        Case("8 KB header value", json.dumps({"messages": []}).encode(), {"X-Padding": "p" * 8192}),
        Case("100 junk headers", json.dumps({"messages": []}).encode(), {f"X-Junk-{i}": "j" * 50 for i in range(100)}),
        Case("charset latin-1 declared", json.dumps({"messages": []}).encode(),
             content_type="application/json; charset=latin-1"),
    ]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
