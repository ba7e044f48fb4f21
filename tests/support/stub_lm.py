"""A stub OpenAI-compatible LM server for tests: deterministic, real HTTP.

It answers DSPy's ChatAdapter prompts field by field: every output field the
prompt asks for gets `<field>: <question>`, where the question is the value of
the last `[[ ## question ## ]]` block. So a test can tell which turn of a
conversation a program answered. Every request's Authorization header is kept
for `/_requests`, so a test can check where keys came from.

Run: python -m tests.support.stub_lm --port N
"""

from __future__ import annotations

import argparse
import re
import time

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()
seen: list[dict] = []


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


@app.post("/v1/chat/completions")
async def chat(request: Request) -> dict:
    body = await request.json()
    seen.append({"authorization": request.headers.get("authorization"), "body": body})
    messages = body.get("messages", [])
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    last = messages[-1]["content"] if messages else ""
    question = _last_field(last, "question")
    parts = [f"[[ ## {name} ## ]]\n{name}: {question}" for name in _output_fields(system)]
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
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
