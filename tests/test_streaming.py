"""Streams are real: text reaches the client as the LM writes it, and a client that leaves
cancels its LM call (counted at the stub LM, which streams one character every 0.05 s for [drip]), through
the shared gateway process."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.processes import stub_requests, stub_stats

QUESTION = "[drip] how slow can you go"


@pytest.fixture(scope="module")
def served(shared_gateway, stub):
    return shared_gateway.url, stub


def _stats(stub: str) -> dict:
    return stub_stats(stub)


def _no_stream_running(stub: str) -> None:
    """The shared stub sends no other stream (an earlier test's cancelled one ends within a chunk)."""
    deadline = time.monotonic() + 10
    while _stats(stub)["streaming"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _stats(stub)["streaming"] == 0


def _body(question: str = QUESTION) -> dict:
    return {"model": "dspy-qa", "stream": True, "messages": [{"role": "user", "content": question}]}


def test_the_first_words_arrive_before_the_lm_has_finished(served):
    url, stub = served
    _no_stream_running(stub)
    streaming_then = None  # how many streams the stub was sending when the first words arrived
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(), timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            delta = choices[0]["delta"] if choices else {}
            if (delta.get("content") or delta.get("reasoning_content")) and streaming_then is None:
                streaming_then = _stats(stub)["streaming"]
    # The stub was still sending when the first words were through: the answer was streamed, not cut up.
    assert streaming_then == 1


def test_clients_that_leave_mid_stream_leave_no_lm_call_running(served):
    url, stub = served
    _no_stream_running(stub)
    started = time.time()
    for _ in range(10):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(), timeout=120) as response:
            for line in response.iter_lines():
                choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
                delta = choices[0]["delta"] if choices else {}
                if delta.get("content") or delta.get("reasoning_content"):
                    break  # the first words, then the client leaves
    seen = [r for r in stub_requests(stub, since=started) if QUESTION in json.dumps(r["body"])]
    assert len(seen) == 10 and all(request["body"].get("stream") for request in seen)  # asked to stream
    deadline = time.monotonic() + 10
    while _stats(stub)["streaming"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stats(stub)["streaming"] == 0
    # And the gateway still answers.
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "user", "content": "still there?"}]})
    assert answer.status_code == 200
