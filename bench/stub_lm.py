"""A stub OpenAI-compatible LM server: deterministic, real HTTP, cheap to run.

The benchmark's LM and the tests' LM. It answers DSPy's ChatAdapter prompts
field by field: every output field the prompt asks for gets
`<field>: <question>`, where the question is the value of the last
`[[ ## question ## ]]` block, followed by `(after N earlier turns)` when the
prompt carries N earlier user messages, or a question folded with N earlier
user turns (so a test can tell which turn of a conversation a program
answered, and that it saw the ones before). `stream: true` gets the same text as
server-sent chunks of a few characters each.

Faults, by a marker in the question:
  [fail500]  HTTP 500                    [rate429]  HTTP 429, Retry-After: 1
  [sleep]    a 30 s hang (noticing a caller that leaves)  [garbage]  200 with text no adapter can parse
  [cut]      a stream that stops halfway (no finish, no [DONE]); without stream,
             the connection closes after half the body
  [trickle]  one character every 0.5 s (streamed), four bytes every 0.5 s (not)
  [drip]     streamed one character every 0.05 s (a slow LM, for time-to-first-text tests)
  [length]   the usual answer, whole, but with finish_reason "length" (as an LM that stopped at max_tokens
             just as its answer ended)
or for every request, with `POST /_mode {"mode": "fail500"}` (`"ok"` restores),
so a test can take the LM down and bring it back. Stop the process for
"connection refused". `--latency` adds a fixed delay to every answer (so a
streamed answer's first token comes after it); `--token-delay` paces a streamed
answer's later chunks, one every so many seconds (0, the default: all at once),
and `POST /_pace {"token_delay": SECONDS}` changes it on a running stub.

`GET /_requests` lists the last requests seen (body and Authorization header);
`GET /_stats` counts them, and the streamed answers still being sent.

Run: python -m bench.stub_lm --port N [--latency SECONDS] [--token-delay SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import deque

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FAULTS = ("fail500", "rate429", "sleep", "garbage", "cut", "trickle", "drip", "length")
_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]")
_OUTPUT = re.compile(r"\d+\. `(\w+)`")


class State:
    latency = 0.0
    token_delay = 0.0  # seconds between a streamed answer's chunks (after the first)
    mode = "ok"
    total = 0
    abandoned = 0  # hung requests whose caller went away
    streaming = 0  # streamed answers being sent right now
    seen: deque = deque(maxlen=2000)  # bounded: a soak test must not grow the stub


# How the gateway folds earlier turns into the question of a program without a history (program/chat.py;
# tests/test_clients.py checks these stay the same): read here so the stub answers the question now.
FOLDED_HEAD = "Earlier in this conversation:"
FOLDED_QUESTION = "The question now:"


def _last_field(text: str, name: str) -> tuple[str, int]:
    """The last value of the field `name`, and the earlier user turns folded into it."""
    blocks = _BLOCK.split(text)
    value = ""
    for i in range(1, len(blocks) - 1, 2):
        if blocks[i] == name:
            value = blocks[i + 1].strip()
    folded_turns, _, question = value.rpartition(FOLDED_QUESTION)
    if not folded_turns.startswith(FOLDED_HEAD):
        folded_turns, question = "", value
    # A value ends at the first blank line (the adapter's closing text follows).
    return question.strip().split("\n\n", 1)[0], folded_turns.count("\nuser: ")


def _output_fields(system: str) -> list[str]:
    # The ChatAdapter's system prompt lists outputs after "Your output fields are:".
    _, _, outputs = system.partition("Your output fields are:")
    outputs = outputs.split("All interactions will be structured", 1)[0]
    return _OUTPUT.findall(outputs) or ["answer"]


def _fault(question: str) -> str | None:
    if State.mode != "ok":
        return State.mode
    return next((name for name in FAULTS if f"[{name}]" in question), None)


def _answer(messages: list[dict], question: str, folded: int) -> str:
    system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    earlier = sum(1 for m in messages[:-1] if m.get("role") == "user") + folded
    seen_turns = f" (after {earlier} earlier turns)" if earlier else ""
    parts = [f"[[ ## {name} ## ]]\n{name}: {question}{seen_turns}" for name in _output_fields(system)]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


def _completion(body: dict, content: str, finish: str = "stop") -> dict:
    return {
        "id": f"stub-{State.total}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _chunk(body: dict, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    data = {"id": f"stub-{State.total}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
            **({"usage": usage} if usage else {})}
    return f"data: {json.dumps(data)}\n\n".encode()


async def _stream(body: dict, content: str, fault: str | None):
    State.streaming += 1
    try:
        yield _chunk(body, {"role": "assistant", "content": ""})
        step = 1 if fault in ("trickle", "drip") else 8
        pieces = [content[i:i + step] for i in range(0, len(content), step)]
        for i, piece in enumerate(pieces):
            if fault == "cut" and i >= len(pieces) // 2:
                return  # stops midway: no finish_reason, no [DONE]
            if fault in ("trickle", "drip"):
                await asyncio.sleep(0.5 if fault == "trickle" else 0.05)
            elif State.token_delay and i:
                await asyncio.sleep(State.token_delay)
            yield _chunk(body, {"content": piece})
        yield _chunk(body, {}, finish="length" if fault == "length" else "stop")
        usage = {"prompt_tokens": 10, "completion_tokens": len(pieces), "total_tokens": 10 + len(pieces)}
        yield _chunk(body, {}, usage=usage)
        yield b"data: [DONE]\n\n"
    finally:
        State.streaming -= 1  # finished, or cancelled because the caller left


async def _trickle(payload: bytes):
    for i in range(0, len(payload), 4):
        await asyncio.sleep(0.5)
        yield payload[i:i + 4]


async def chat(request: Request) -> Response:
    body = json.loads(await request.body())
    State.total += 1
    State.seen.append({"authorization": request.headers.get("authorization"), "body": body, "t": time.time()})
    messages = body.get("messages") or []
    question, folded = _last_field(messages[-1].get("content") or "", "question") if messages else ("", 0)
    fault = _fault(question)
    if fault == "fail500":
        return JSONResponse({"error": {"message": "stub failure", "type": "server_error"}}, status_code=500)
    if fault == "rate429":
        return JSONResponse({"error": {"message": "slow down", "type": "rate_limit_error"}}, status_code=429,
                            headers={"Retry-After": "1"})
    if fault == "sleep":
        # A hang: but one that notices when its caller gives up (counted in /_stats).
        for _ in range(300):
            if await request.is_disconnected():
                State.abandoned += 1
                return Response(status_code=499)
            await asyncio.sleep(0.1)
    await asyncio.sleep(State.latency)
    content = "I am not following any format at all." if fault == "garbage" else _answer(messages, question, folded)
    if body.get("stream"):
        return StreamingResponse(_stream(body, content, fault), media_type="text/event-stream")
    payload = json.dumps(_completion(body, content, "length" if fault == "length" else "stop")).encode()
    if fault == "trickle":
        return StreamingResponse(_trickle(payload), media_type="application/json")
    if fault == "cut":
        # Promise the whole body, send half of it: the client sees the connection break.
        half = payload[: len(payload) // 2]
        return StreamingResponse(iter([half]), headers={"content-length": str(len(payload))},
                                 media_type="application/json")
    return Response(payload, media_type="application/json")


async def requests_seen(_: Request) -> JSONResponse:
    return JSONResponse(list(State.seen))


async def stats(_: Request) -> JSONResponse:
    return JSONResponse({"total": State.total, "abandoned": State.abandoned, "streaming": State.streaming,
                         "mode": State.mode})


async def set_mode(request: Request) -> JSONResponse:
    mode = (await request.json()).get("mode", "ok")
    if mode != "ok" and mode not in FAULTS:
        return JSONResponse({"error": f"unknown mode {mode!r}"}, status_code=400)
    State.mode = mode
    return JSONResponse({"mode": mode})


async def set_pace(request: Request) -> JSONResponse:
    delay = (await request.json()).get("token_delay", 0.0)
    if not isinstance(delay, int | float) or delay < 0:
        return JSONResponse({"error": f"token_delay must be seconds >= 0, not {delay!r}"}, status_code=400)
    State.token_delay = float(delay)
    return JSONResponse({"token_delay": State.token_delay})


app = Starlette(routes=[
    Route("/v1/chat/completions", chat, methods=["POST"]),
    Route("/_requests", requests_seen),
    Route("/_stats", stats),
    Route("/_mode", set_mode, methods=["POST"]),
    Route("/_pace", set_pace, methods=["POST"]),
])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before every answer")
    parser.add_argument("--token-delay", type=float, default=0.0,
                        help="seconds between a streamed answer's chunks (after the first)")
    args = parser.parse_args()
    State.latency = args.latency
    State.token_delay = args.token_delay
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
