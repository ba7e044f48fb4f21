"""Streams are real: text reaches the client as the LM writes it, and a client that leaves
cancels its LM call (counted at a stub LM that streams one character every 0.05 s)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.processes import gateway, stub_lm

pytestmark = pytest.mark.slow
QUESTION = "[drip] how slow can you go"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streams")
    with stub_lm(tmp) as base, gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp, "--no-traces",
                                       DSPY_LM_API_BASE=base) as url:
        yield url, base.removesuffix("/v1")


def _stats(stub: str) -> dict:
    return httpx.get(f"{stub}/_stats", timeout=10).json()


def _body(question: str = QUESTION) -> dict:
    return {"model": "dspy-qa", "stream": True, "messages": [{"role": "user", "content": question}]}


def test_the_first_words_arrive_before_the_lm_has_finished(served):
    url, stub = served
    started = time.monotonic()
    first_text_at = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(), timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            delta = choices[0]["delta"] if choices else {}
            if (delta.get("content") or delta.get("reasoning_content")) and first_text_at is None:
                first_text_at = time.monotonic() - started
                streaming_then = _stats(stub)["streaming"]
        total = time.monotonic() - started
    assert first_text_at is not None
    # The stub was still sending when the first words were through: the answer was streamed, not cut up.
    assert streaming_then == 1
    assert first_text_at < total / 2


def test_clients_that_leave_mid_stream_leave_no_lm_call_running(served):
    url, stub = served
    for _ in range(10):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(), timeout=120) as response:
            for line in response.iter_lines():
                choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
                delta = choices[0]["delta"] if choices else {}
                if delta.get("content") or delta.get("reasoning_content"):
                    break  # the first words, then the client leaves
    seen = httpx.get(f"{stub}/_requests", timeout=10).json()[-10:]
    assert all(request["body"].get("stream") for request in seen)  # the LM was asked to stream
    deadline = time.monotonic() + 10
    while _stats(stub)["streaming"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stats(stub)["streaming"] == 0
    # And the gateway still answers.
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "user", "content": "still there?"}]})
    assert answer.status_code == 200
