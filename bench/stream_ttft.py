"""Streaming time to first text, at one client: through the gateway against the LM called directly.

The stub LM streams its answer in chunks of 8 characters: the first after the bench's LM latency,
the rest `token_delay` apart (a paced stream, so that a gateway which waited for the whole answer
would show it). Calls alternate, direct to the stub (with the very request the gateway sends it)
and through the gateway's `/v1/chat/completions` with `stream: true`, each on its own keep-alive
connection. Figures are p50s:

- the LM's time to first token: its first non-empty content delta;
- the gateway's time to first text: its first content (or reasoning) delta;
- the LM's time to first field text: when its raw stream first holds a `[[ ## field ## ]]` marker
  and a character of the field's value, the earliest the gateway can have text to send. The
  gateway's figure minus this one is what the gateway itself adds; this one minus the LM's first
  token is what waiting for the marker costs (the program's output format, not the gateway).

Target: gateway time to first text <= the LM's time to first token + 5 ms.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from pathlib import Path

import aiohttp
import httpx

from bench.launch import CHAT, gateway_args, start
from bench.steal import measured

TARGET_MS = 5.0
FIELD_TEXT = re.compile(r"\[\[ ## \w+ ## \]\]\s*\S")


async def stream_marks(session: aiohttp.ClientSession, url: str, body: dict) -> dict[str, float | None]:
    """One streamed chat completion, read to the end; seconds from sending it to its first text
    (content or reasoning), first content, and first field text (a DSPy field's marker and value, in raw LM text)."""
    marks: dict[str, float | None] = {"first_text": None, "first_content": None, "first_field_text": None}
    raw = ""
    started = time.perf_counter()
    async with session.post(url, json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.content:
            text = line.decode().strip()
            if not text.startswith("data: {"):
                continue
            now = time.perf_counter() - started
            choices = json.loads(text[len("data: "):]).get("choices") or [{}]
            delta = choices[0].get("delta", {})
            content, reasoning = delta.get("content") or "", delta.get("reasoning_content") or ""
            if marks["first_text"] is None and (content or reasoning):
                marks["first_text"] = now
            if marks["first_content"] is None and content:
                marks["first_content"] = now
            raw += content
            if marks["first_field_text"] is None and FIELD_TEXT.search(raw):
                marks["first_field_text"] = now
    return marks


def _p50_ms(runs: list[dict[str, float | None]], mark: str) -> float | None:
    values = [run[mark] for run in runs if run[mark] is not None]
    return round(statistics.median(values) * 1000, 2) if values else None


async def _alternating(stub_url: str, sent: dict, gateway_url: str, calls: int) -> tuple[list, list]:
    direct, through = [], []
    async with aiohttp.ClientSession() as to_stub, aiohttp.ClientSession() as to_gateway:
        await stream_marks(to_stub, stub_url, sent)  # both connections open before the first counted call
        await stream_marks(to_gateway, gateway_url, CHAT)
        for _ in range(calls):
            direct.append(await stream_marks(to_stub, stub_url, sent))
            through.append(await stream_marks(to_gateway, gateway_url, CHAT))
    return direct, through


def stream_ttft_figures(env: dict[str, str], tmp: Path, model_uri: str, stub: str, token_delay: float,
                        calls: int = 30) -> dict:
    """p50 time to first text through the gateway against the stub LM's own, streamed, at one client.

    `stub` is the base URL of the stub LM that `model_uri` was logged against; its pace is set to
    `token_delay` for the measurement and put back to 0 after. `calls` streamed calls on each side.
    """
    context, base, _ = start(gateway_args(model_uri), "/ready", env, tmp / "stream.log")
    httpx.post(f"{stub}/_pace", json={"token_delay": token_delay}, timeout=10).raise_for_status()
    try:
        with context, measured() as steal:
            gateway_url = f"{base}/v1/chat/completions"
            with httpx.stream("POST", gateway_url, json={**CHAT, "stream": True}, timeout=60) as response:
                response.raise_for_status()
                response.read()
            sent = httpx.get(f"{stub}/_requests", timeout=10).json()[-1]["body"]  # what the gateway asks the LM
            direct, through = asyncio.run(_alternating(f"{stub}/v1/chat/completions", sent, gateway_url, calls))
    finally:
        httpx.post(f"{stub}/_pace", json={"token_delay": 0}, timeout=10)
    lm_first_token = _p50_ms(direct, "first_text")
    lm_field_text = _p50_ms(direct, "first_field_text")
    gateway_first_text = _p50_ms(through, "first_text")
    missing = lm_first_token is None or lm_field_text is None or gateway_first_text is None
    difference = None if missing else round(gateway_first_text - lm_first_token, 2)
    return {"token_delay_s": token_delay, "requests_each": calls,
            "lm_first_token_p50_ms": lm_first_token, "gateway_first_text_p50_ms": gateway_first_text,
            "difference_ms": difference,
            "gateway_first_content_p50_ms": _p50_ms(through, "first_content"),
            "lm_first_field_text_p50_ms": lm_field_text,
            "marker_wait_ms": None if missing else round(lm_field_text - lm_first_token, 2),
            "gateway_own_ms": None if missing else round(gateway_first_text - lm_field_text, 2),
            "target": f"gateway p50 time to first text <= the LM's p50 time to first token + {TARGET_MS:g} ms",
            "pass": difference is not None and difference <= TARGET_MS,
            # What the gateway itself adds, from the moment the LM's text holds a character to show.
            "own_target": f"gateway p50 time to first text <= the LM's p50 time to first field text + {TARGET_MS:g} ms",
            "own_pass": not missing and gateway_first_text - lm_field_text <= TARGET_MS,
            "cpu_steal_percent": steal["percent"]}
