"""A stub OpenAI-compatible LM server for tests: deterministic, real HTTP.

It answers DSPy's ChatAdapter prompts field by field: every output field the
prompt asks for gets `<field>: <question>`, where the question is the value of
the last `[[ ## question ## ]]` block, followed by `(after N earlier turns)`
when the prompt carries N earlier user messages. So a test can tell which turn of a
conversation a program answered. Every request's Authorization header is kept
for `/_requests`, so a test can check where keys came from.

Faults on demand, by a marker in the question: `[fail500]` answers HTTP 500,
`[sleep]` answers after 30 s. `--latency` adds a fixed delay to every answer.

Run: python -m tests.support.stub_lm --port N [--latency SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()
seen: list[dict] = []
latency = 0.0


def _last_field(text: str, name: str) -> str:
    blocks = re.split(r"\[\[ ## (\w+) ## \]\]", text)
    value = ""
    for i in range(1, len(blocks) - 1, 2):
        if blocks[i] == name:
            # A value ends at the first blank line (the adapter's closing text follows).
            value = blocks[i + 1].strip().split("\n\n", 1)[0]
    return value


def _output_fields(system: str) -> list[str]:
    # The ChatAdapter's system prompt lists outputs after "Your output fields are:".
    _, _, outputs = system.partition("Your output fields are:")
    outputs = outputs.split("All interactions will be structured", 1)[0]
    return re.findall(r"\d+\. `(\w+)`", outputs) or ["answer"]


@app.post("/v1/chat/completions", response_model=None)
async def chat(request: Request) -> dict | JSONResponse:
    body = await request.json()
    seen.append({"authorization": request.headers.get("authorization"), "body": body})
    messages = body.get("messages", [])
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    last = messages[-1]["content"] if messages else ""
    question = _last_field(last, "question")
    if "[fail500]" in question:
        return JSONResponse({"error": {"message": "stub failure", "type": "server_error"}}, status_code=500)
    await asyncio.sleep(30 if "[sleep]" in question else latency)
    # Earlier user turns (history, or demos) show in the answer, so a test can
    # tell a program that saw the conversation from one that did not.
    earlier = sum(1 for m in messages[:-1] if m["role"] == "user")
    seen_turns = f" (after {earlier} earlier turns)" if earlier else ""
    parts = [f"[[ ## {name} ## ]]\n{name}: {question}{seen_turns}" for name in _output_fields(system)]
    content = "\n\n".join([*parts, "[[ ## completed ## ]]"])
    return {
        "id": f"stub-{len(seen)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@app.get("/_requests")
async def requests_seen() -> list[dict]:
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before every answer")
    args = parser.parse_args()
    global latency
    latency = args.latency
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
